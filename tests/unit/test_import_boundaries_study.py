"""The study's building blocks stay light: the paired statistics need only numpy, the sampled KL
only torch, and the report can be rebuilt without Ray, torch or MLflow (DESIGN.md: module boundaries)."""

import subprocess
import sys

import pytest


pytestmark = pytest.mark.integration  # each check imports in a fresh interpreter


@pytest.mark.parametrize("module, forbidden", [
    ("evaluation.paired", ("torch", "ray", "mlflow", "transformers")),
    ("evaluation.kl", ("ray", "mlflow", "transformers")),
    ("orchestrator.study.report", ("torch", "ray", "mlflow", "transformers")),
])
def test_study_modules_import_light(module, forbidden):
    code = (
        f"import sys, {module}; "
        f"bad = [m for m in {forbidden!r} if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"{module} pulled in: {result.stdout.strip()} {result.stderr[-500:]}"
