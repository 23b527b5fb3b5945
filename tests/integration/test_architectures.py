"""The shapes users bring: GPT-NeoX (Pythia), Llama, Qwen2 (tied), GPT-2 (Conv1D, tied, learned
positions) and Mistral, each a tiny random-weight model written by ``save_pretrained``.

On 2 gloo ranks (torchrun): loading once into FSDP2 shards reproduces the saved weights, the
shard-local soft and hard updates equal the unsharded ones, activation checkpointing leaves the
gradients unchanged; and a 2-worker training matches a 1-worker training with the same global
batch, step by step, validation included (17 validation pairs: uneven across the 2 ranks).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from trainers.fsdp_check import FAMILIES, train_family

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, free_port):
    work = tmp_path_factory.mktemp("architectures")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port),
           "-m", "trainers.fsdp_check", "--work-dir", str(work), "--train"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    print(out.stdout)
    checks = {m.group(1): {k: float(v) for k, v in re.findall(r"(\w+)_max_abs_diff=(\S+)", m.group(0))}
              for m in re.finditer(r"fsdp_check family=(\w+) world=2 device=cpu .*", out.stdout)}
    curves = {}
    for line in out.stdout.splitlines():
        if line.startswith("fsdp_train "):
            record = json.loads(line.removeprefix("fsdp_train "))
            curves[record["family"]] = record["curve"]
    return work, checks, curves


def test_sharded_loading_updates_and_checkpointing_are_exact_for_every_family(two_rank_run):
    _, checks, _ = two_rank_run
    assert set(checks) == set(FAMILIES)
    for family, diffs in checks.items():
        assert set(diffs) == {"load", "soft", "hard", "checkpointing_grad"}, family
        # Loading, copying and the updates move bytes; checkpointing recomputes the same ops.
        assert diffs["load"] == 0.0 and diffs["soft"] == 0.0 and diffs["hard"] == 0.0, (family, diffs)
        assert diffs["checkpointing_grad"] <= 1e-6, (family, diffs)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_workers_match_one_worker_with_the_same_global_batch(two_rank_run, family):
    work, _, curves = two_rank_run
    two = curves[family]
    one = train_family(work / "models" / family, work / f"run-{family}-world1", world=1)
    assert sorted(map(int, two)) == sorted(one) == [1, 2, 3, 4]
    worst = 0.0
    for step, metrics in one.items():
        assert set(metrics) == set(two[str(step)]), step
        for key, value in metrics.items():
            worst = max(worst, abs(value - two[str(step)][key]))
    print(f"{family}: max |1 worker - 2 workers| over loss and validation curves = {worst:.2e}")
    assert worst <= 1e-5
    assert "val/loss" in one[2] and "val/kl_to_initial" in one[4]  # the uneven validation ran
