"""scripts/gpu_check.py end to end on CPU (--allow-cpu --quick): the script, torchrun and its
workers, every step of the GPU check on tiny models; its step 3 is also the test of
``benchmarks/memory.py plan --quick`` (tests/integration/test_benchmarks.py leaves that case to this file)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.integration
def test_the_whole_check_passes_on_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--allow-cpu", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    passed = [line for line in done.stdout.splitlines() if line.startswith("PASS ")]
    assert len(passed) == 7, done.stdout  # sharding, packing, soft training + export, hard training + export, LoRA
    assert "PASS LoRA training: loss 0.6931" in done.stdout and "LoRA peak memory rank 0" in done.stdout
    assert "all checks passed" in done.stdout
    # Step 3 runs `benchmarks/memory.py plan --quick` (exit 0 or the check fails) and shows its result
    # line; benchmarks/README.md takes the plan's accuracy from this line (this is that script's test).
    assert re.search(r"plan/measured over \d+ shapes", done.stdout), done.stdout
    assert re.search(r"LoRA peak memory rank 0: .*\(plan/measured \d+(?:\.\d+)?\)", done.stdout), done.stdout

