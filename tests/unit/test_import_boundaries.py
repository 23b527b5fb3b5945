"""The pure cores import without the heavy world (DESIGN.md: module boundaries)."""

import subprocess
import sys

import pytest


pytestmark = pytest.mark.integration  # each check imports in a fresh interpreter


@pytest.mark.parametrize("module", ["trainers.trdpo", "evaluation.config", "evaluation.metrics", "evaluation.verdicts"])
def test_pure_modules_do_not_import_ray_mlflow_or_transformers(module):
    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('ray', 'mlflow', 'transformers') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"{module} pulled in: {result.stdout.strip()} {result.stderr[-500:]}"


def test_what_ray_trains_controller_unpickles_imports_no_mlflow_transformers_or_the_loop():
    """Every launch's controller process unpickles trdpo's failure policy and the workers' TrainSpec,
    and so imports their modules: MLflow, transformers and the training loop there would be seconds
    of CPU for nothing."""
    code = (
        "import sys, orchestrator.ray_trainer, trainers.config; "
        "bad = [m for m in ('mlflow', 'transformers', 'trainers.loop', 'torch.distributed.checkpoint', 'trainers.state.checkpoint') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"orchestrator.ray_trainer or trainers.config pulled in: {result.stdout.strip()} {result.stderr[-500:]}"
