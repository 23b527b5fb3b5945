"""LoRA TR-DPO in the real loop (one process): the reference adapter follows the paper's rule in
weight space, hard copies bitwise, none is the base, step 0 is ln 2, and resume is exact."""

from __future__ import annotations

import math

import pytest
import torch

from trainers import loop
from trainers.fsdp_check import save_tiny_family
from trainers.model import sharding
from trainers.model.lora import INITIAL, POLICY, REFERENCE, merged_weights
from trainers.sessions import LocalSession
from trainers.state.checkpoint import read_checkpoint
from trainers.state.storage import Storage
from mlflow_store import sqlite_store

pytestmark = pytest.mark.slow

RANK, LORA_ALPHA = 4, 8.0
SCALING = LORA_ALPHA / RANK


def lora_config(root, model_dir, *overrides):
    from orchestrator.config import load_experiment

    return load_experiment(None, [
        "model.tiny=null", f"model.name_or_path={model_dir}", f"model.lora.rank={RANK}", f"model.lora.alpha={LORA_ALPHA}",
        "data.synthetic.num_pairs=80", "data.validation_fraction=0.1", "data.max_length=48",
        "training.per_device_batch_size=4", "training.max_steps=12", "training.warmup_steps=0", "training.log_every=1",
        "training.learning_rate=1e-2", "training.eval_every=12", "training.checkpoint_every=4",
        f"tracking.tracking_uri={sqlite_store(root / 'mlflow.db')}", f"tracking.output_dir={root}/runs", *overrides])


def train_recording(config, run_uri, monkeypatch, stop_after: int | None = None):
    """Train in this process; returns (models, merged policy weights after each step, logged metrics)."""
    built, policies, logged = {}, {}, []
    build = sharding.build_models

    def keep(*args, **kwargs):
        built["models"] = build(*args, **kwargs)
        return built["models"]

    def after_step(uri, step, rank):
        # in fp32: a bf16 base's merged weights would round the (small) adapter deltas away
        state = {k: v.float() for k, v in built["models"].policy.state_dict().items()}
        policies[step] = merged_weights(state, POLICY, SCALING)
        if stop_after is not None and step == stop_after:
            raise KeyboardInterrupt  # a crash right after a checkpoint step

    monkeypatch.setattr(loop, "build_models", keep)
    spec = loop.TrainSpec(config.model, config.tokenizer, config.data, config.training, str(run_uri),
                          step_logger=logged.append, after_step=after_step)
    session = LocalSession(lambda metrics, where: None, Storage(str(run_uri)).child(loop.CHECKPOINTS))
    try:
        loop.train(spec, session)
    except KeyboardInterrupt:
        pass
    return built["models"], policies, logged


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_soft_reference_is_the_weight_space_rule(family, tmp_path, monkeypatch):
    model_dir = save_tiny_family(family, tmp_path / family)
    config = lora_config(tmp_path, model_dir, "training.ref_update=soft", "training.alpha=0.6", "training.tau=2")
    models, policies, logged = train_recording(config, tmp_path / "run", monkeypatch)
    state = models.policy.state_dict()
    base = merged_weights(state, INITIAL, SCALING)
    reference = merged_weights(state, REFERENCE, SCALING)
    alpha, update_steps = 0.6, [2, 4, 6, 8, 10, 12]
    K = len(update_steps)
    worst = 0.0
    for name, weight in base.items():
        expected = (1 - alpha) ** K * weight.double()
        for k, step in enumerate(update_steps, start=1):
            expected = expected + alpha * (1 - alpha) ** (K - k) * policies[step][name].double()
        if not torch.equal(policies[12][name], weight):  # an adapted weight
            worst = max(worst, relative(reference[name] - weight, expected - weight.double()))
        assert relative(reference[name], expected) <= 1e-5, name
    assert 0 < worst <= 1e-5  # the deltas themselves, not only the (base-dominated) weights
    assert abs(logged[0]["train/loss"] - math.log(2)) < 1e-6  # step 1's loss: policy = reference = base
    errors = [m["ref/lora_error"] for m in logged if "ref/lora_error" in m]
    assert [m["step"] for m in logged if "ref/lora_error" in m][0] == 2 and max(errors) <= 1e-5
    # the optimizer moved only the policy adapter: the base is the starting model
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert all(torch.equal(base[k], start[k]) for k in start if k in base)


def test_a_bf16_base_stays_frozen_in_bf16_while_fp32_adapters_follow_the_soft_rule(tmp_path, monkeypatch):
    model_dir = save_tiny_family("llama", tmp_path / "llama")
    config = lora_config(tmp_path, model_dir, "model.lora.base_dtype=bf16", "training.precision=bf16",
                         "training.max_steps=6", "training.ref_update=soft", "training.alpha=0.6", "training.tau=2")
    models, policies, logged = train_recording(config, tmp_path / "run", monkeypatch)
    params = dict(models.policy.named_parameters())
    base = {n: p for n, p in params.items() if ".lora_" not in n}
    adapters = {n: p for n, p in params.items() if ".lora_" in n}
    assert base and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base.values())
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert {n for n, p in adapters.items() if p.requires_grad} == {n for n in adapters if f".{POLICY}." in n}
    from transformers import AutoModelForCausalLM

    start = {k: v.to(torch.bfloat16) for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}
    state = {k: v.float() for k, v in models.policy.state_dict().items()}
    initial = merged_weights(models.policy.state_dict(), INITIAL, SCALING)
    assert all(torch.equal(initial[k], start[k]) for k in start if k in initial)  # the base, bitwise, in bf16
    assert abs(logged[0]["train/loss"] - math.log(2)) < 1e-6  # step 1: policy = reference = base, in bf16 too
    assert all(math.isfinite(m["train/loss"]) for m in logged) and len(logged) == 6
    # The reference's delta is the weight-space rule over the fp32 adapters (the base cancels out).
    base32, reference = merged_weights(state, INITIAL, SCALING), merged_weights(state, REFERENCE, SCALING)
    K, worst = 3, 0.0
    for name, weight in base32.items():
        expected = sum(0.6 * 0.4 ** (K - k) * (policies[step][name].double() - weight.double())
                       for k, step in enumerate([2, 4, 6], start=1))
        if not torch.equal(policies[6][name], weight):
            worst = max(worst, relative(reference[name] - weight, expected))
    assert 0 < worst <= 1e-5


def test_hard_reference_is_the_policy_at_the_last_update_and_none_is_the_base(tmp_path, monkeypatch):
    model_dir = save_tiny_family("llama", tmp_path / "llama")
    config = lora_config(tmp_path, model_dir, "training.ref_update=hard", "training.alpha=null", "training.tau=5")
    models, policies, logged = train_recording(config, tmp_path / "hard", monkeypatch)
    reference = merged_weights(models.policy.state_dict(), REFERENCE, SCALING)
    assert all(torch.equal(reference[k], policies[10][k]) for k in reference)
    assert not all(torch.equal(reference[k], policies[12][k]) for k in reference)
    assert all("ref/lora_error" not in m for m in logged)

    config = lora_config(tmp_path, model_dir, "training.ref_update=none", "training.alpha=null", "training.tau=null")
    models, policies, logged = train_recording(config, tmp_path / "none", monkeypatch)
    assert not any(".reference." in n for n, _ in models.policy.named_parameters())  # no second adapter
    assert abs(logged[0]["train/loss"] - math.log(2)) < 1e-6
    x = torch.arange(20)[None]
    with torch.no_grad():
        with models.roles.active(REFERENCE):
            ref_logits = models.policy(input_ids=x).logits
        from transformers import AutoModelForCausalLM

        base_logits = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=x).logits
        policy_logits = models.policy(input_ids=x).logits
    assert torch.allclose(ref_logits, base_logits, atol=1e-6) and not torch.allclose(policy_logits, base_logits, atol=1e-4)


def test_lora_checkpoints_hold_adapters_only_and_resume_exactly(tmp_path, monkeypatch):
    model_dir = save_tiny_family("gpt_neox", tmp_path / "neox")
    config = lora_config(tmp_path, model_dir, "training.ref_update=soft", "training.alpha=0.6", "training.tau=2")
    straight, _, _ = train_recording(config, tmp_path / "straight", monkeypatch)
    train_recording(config, tmp_path / "resumed", monkeypatch, stop_after=5)  # last checkpoint: step 4
    resumed, _, logged = train_recording(config, tmp_path / "resumed", monkeypatch)
    assert logged[0]["step"] == 5
    a, b = straight.policy.state_dict(), resumed.policy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = read_checkpoint(Storage(str(tmp_path / "resumed")).child(loop.CHECKPOINTS))
    assert saved["policy"] and all(".lora_" in k for k in saved["policy"])  # the base is not saved again
    assert {k.split(".lora_")[1].split(".")[1] for k in saved["policy"]} == {"policy", "reference"}
    assert saved["updater"]["lora"]["error_bound"]["alpha"] == 0.6


COMPARED = ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins", "train/grad_norm")


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_packed_chunked_lora_training_matches_the_padded_whole_logits_path(family, tmp_path, monkeypatch):
    import json
    import random

    model_dir = save_tiny_family(family, tmp_path / family)
    rng, words = random.Random(0), "the a cat dog sat ran on mat far near big small red blue".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    rows = [{"prompt": text(rng.randint(1, 3)), "chosen": text(rng.randint(1, 8)), "rejected": text(rng.randint(1, 8))}
            for _ in range(80)]  # lengths from a few tokens to most of max_length: packing has something to pack
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    soft = ("training.ref_update=soft", "training.alpha=0.6", "training.tau=2", "training.max_steps=6",
            "data.format=preference", f"data.path={data}")
    fast = lora_config(tmp_path, model_dir, *soft, "training.packing=true", "training.logprob_chunk_tokens=16")
    plain = lora_config(tmp_path, model_dir, *soft, "training.packing=false", "training.logprob_chunk_tokens=null")
    _, _, fast_logged = train_recording(fast, tmp_path / "fast", monkeypatch)
    _, _, plain_logged = train_recording(plain, tmp_path / "plain", monkeypatch)
    assert [m["step"] for m in fast_logged] == [m["step"] for m in plain_logged] == list(range(1, 7))
    assert max(m["train/packed_fraction"] for m in fast_logged) > 0  # packing did pack
    assert all(m.get("train/packed_fraction", 0) == 0 for m in plain_logged)
    for a, b in zip(fast_logged, plain_logged):
        for key in COMPARED:
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
