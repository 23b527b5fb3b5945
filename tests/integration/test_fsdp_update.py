"""The shard-local reference update under FSDP2 equals the update on gathered weights
(2 gloo ranks on CPU): every parameter, embedding, final norm and lm_head included, tied or not."""

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_shard_local_soft_and_hard_updates_match_unsharded():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m", "trainers.fsdp_check"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = re.findall(r"fsdp_check world=2 device=cpu tied=(\w+) mode=(\w+) max_abs_diff=(\S+)", out.stdout)
    print(out.stdout)
    assert {(t, m) for t, m, _ in lines} == {("False", "soft"), ("False", "hard"), ("True", "soft"), ("True", "hard")}
    for tied, mode, diff in lines:
        assert float(diff) == 0.0, f"tied={tied} mode={mode}: max abs diff {diff}"
