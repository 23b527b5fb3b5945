"""The shapes users bring: GPT-NeoX (Pythia), Llama, Qwen2 (tied), GPT-2 (Conv1D, tied, learned
positions) and Mistral, each a tiny random-weight model written by ``save_pretrained``.

On 2 gloo ranks (torchrun): loading once into FSDP2 shards reproduces the saved weights, the
shard-local soft and hard updates equal the unsharded ones, activation checkpointing leaves the
gradients unchanged; and a 2-worker training matches a 1-worker training with the same global
batch, step by step, validation included (17 validation pairs: uneven across the 2 ranks).

The fast path against the reference path: packed micro-batches with chunked log-probs against
padded rows with whole logits, on long-tailed data, fp32, 16 steps, gradient accumulation 2, soft
and hard updates, on 1 and on 2 workers: every step's loss, rewards and gradient norm, and every
validation metric (the chunked KL included), agree within 1e-5.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from trainers.fsdp_check import FAMILIES, UPDATES, packing_curves, train_family

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.exactness]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, free_port):
    work = tmp_path_factory.mktemp("architectures")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port),
           "-m", "trainers.fsdp_check", "--work-dir", str(work), "--train", "--packing"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    print(out.stdout)
    checks = {m.group(1): {k: float(v) for k, v in re.findall(r"(\w+)_max_abs_diff=(\S+)", m.group(0))}
              for m in re.finditer(r"fsdp_check family=(\w+) world=2 device=cpu .*", out.stdout)}
    curves, packing = {}, {}
    for line in out.stdout.splitlines():
        if line.startswith("fsdp_train "):
            record = json.loads(line.removeprefix("fsdp_train "))
            curves[record["family"]] = record["curve"]
        if line.startswith("fsdp_packing "):
            record = json.loads(line.removeprefix("fsdp_packing "))
            packing[record["family"]] = record["curves"]
    return work, checks, curves, packing


def test_sharded_loading_updates_and_checkpointing_are_exact_for_every_family(two_rank_run):
    _, checks, _, _ = two_rank_run
    assert set(checks) == set(FAMILIES)
    for family, diffs in checks.items():
        assert set(diffs) == {"load", "soft", "hard", "checkpointing_grad"}, family
        # Loading, copying and the updates move bytes; checkpointing recomputes the same ops.
        assert diffs["load"] == 0.0 and diffs["soft"] == 0.0 and diffs["hard"] == 0.0, (family, diffs)
        assert diffs["checkpointing_grad"] <= 1e-6, (family, diffs)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_workers_match_one_worker_with_the_same_global_batch(two_rank_run, family):
    work, _, curves, _ = two_rank_run
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


def worst_differences(fast: dict, reference: dict) -> dict[str, float]:
    """Per metric, the largest difference over the steps (relative to the value for the summed
    validation log-probs, which are tens of nats)."""
    assert sorted(map(int, fast)) == sorted(map(int, reference)) == list(range(1, 17))
    worst: dict[str, float] = {}
    for step, metrics in reference.items():
        assert set(metrics) == set(fast[step]), step
        for key, value in metrics.items():
            scale = max(1.0, abs(value)) if key.startswith("val/") else 1.0
            worst[key] = max(worst.get(key, 0.0), abs(fast[step][key] - value) / scale)
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_chunked_training_equals_the_padded_path_on_one_and_two_workers(two_rank_run, family):
    work, _, _, packing = two_rank_run
    one = packing_curves(work / "models" / family, work, 1, work / "long_tailed.jsonl")
    for world, curves in ((1, one), (2, packing[family])):
        for update in UPDATES:
            worst = worst_differences({str(k): v for k, v in curves[update]["fast"].items()},
                                      {str(k): v for k, v in curves[update]["reference"].items()})
            print(f"{family} {update} world {world}: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
            assert {"train/loss", "train/rewards/chosen", "train/grad_norm", "val/loss", "val/kl_to_initial"} <= set(worst)
            assert max(worst.values()) <= 1e-5, (family, update, world, worst)

