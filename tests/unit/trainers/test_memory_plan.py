"""`trdpo plan`'s working-memory terms and its search for the cheapest settings that fit
(trainers.model.memory), on meta-device skeletons (no weights)."""

import re

from trainers.config import DataConfig, TrainingConfig
from trainers.model.memory import (GIB, MicroBatchShape, known_architecture, measured_shape, plan_memory, suggestions,
                             worst_case_shape)
from trainers.data.types import TokenizedPair


def skeleton(size: str):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(known_architecture(f"EleutherAI/pythia-{size}"))


HH = DataConfig(format="synthetic", max_length=512, max_prompt_length=256)


def long_tailed_pairs(n: int, longest: int) -> list[TokenizedPair]:
    import random

    rng = random.Random(1)

    def length(limit: int) -> int:
        return max(1, min(limit, int(rng.lognormvariate(1.8, 0.8))))

    pairs = []
    for row in range(n):
        prompt = [5] * length(longest // 2)
        pairs.append(TokenizedPair(prompt, [6] * length(longest - len(prompt)), [7] * length(longest - len(prompt)), row))
    return pairs


def training(**kw) -> TrainingConfig:
    kw.setdefault("max_steps", 100)
    kw.setdefault("ref_update", "soft")
    kw.setdefault("alpha", 0.6)
    kw.setdefault("tau", 64)
    return TrainingConfig(**kw)


def test_chunked_log_probs_are_charged_per_chunk_and_whole_logits_per_position():
    model = skeleton("410m")
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    shape = MicroBatchShape(positions=8192, label_positions=3000, source="test")
    whole = plan_memory(model, HH, training(logprob_chunk_tokens=None, packing=False), bf16=True, shape=shape)
    whole_packed = plan_memory(model, HH, training(logprob_chunk_tokens=None), bf16=True, shape=shape)
    chunked = plan_memory(model, HH, training(logprob_chunk_tokens=1024), bf16=True, shape=shape)
    # whole, padded: the policy's pass (20 bytes) + the reference pass (8 bytes), at every position
    assert whole.logits == 8192 * vocab * 28
    # whole, packed: every position's logits for a moment, the label rows kept
    assert whole_packed.logits == 8192 * vocab * 4 + 3000 * vocab * 8
    # chunked, bf16 autocast on one worker: one chunk's logits at a time, the fp32 head-gradient
    # accumulator, the weight's bf16 cast and the reused bf16 product buffer
    assert chunked.logits == 1024 * vocab * 12 + 4 * vocab * hidden + 2 * vocab * hidden + 2 * min(1024 * vocab, vocab * hidden)
    assert chunked.activations == whole.activations and chunked.model_states == whole.model_states
    tiny = plan_memory(model, HH, training(logprob_chunk_tokens=1024), bf16=True, shape=MicroBatchShape(8192, 100, "few labels"))
    assert tiny.logits == 100 * vocab * 12  # labels that fit one chunk are scored whole: no accumulator


def test_the_worst_case_is_the_token_budget_packed_and_the_full_rectangle_padded():
    packed = worst_case_shape(HH, training(per_device_batch_size=8))
    padded = worst_case_shape(HH, training(per_device_batch_size=8, packing=False))
    assert packed.positions == padded.positions == 2 * 8 * 512  # the default budget never exceeds the padded case
    assert worst_case_shape(HH, training(max_tokens_per_micro_batch=2048)).positions == 2048


def test_long_tailed_data_makes_packed_micro_batches_far_below_the_worst_case():
    data = DataConfig(format="synthetic", max_length=64, max_prompt_length=32)
    pairs = long_tailed_pairs(300, longest=64)
    packed = measured_shape(pairs, data, training(per_device_batch_size=8), world=1)
    padded = measured_shape(pairs, data, training(per_device_batch_size=8, packing=False), world=1)
    worst = worst_case_shape(data, training(per_device_batch_size=8))
    assert packed.positions < padded.positions <= worst.positions
    assert packed.label_positions < packed.positions  # prompts never reach the head
    assert "sampled steps" in packed.source


def changes(line: str) -> dict[str, str]:
    return dict(re.findall(r"training\.(\w+)=(\S+?)(?:,|$)", line))


def test_pythia_12b_fp32_on_8_workers_gets_the_cheap_fixes_before_more_workers():
    """The case the issue found: 44 GiB of deferred unsharded gradients per worker, and the old
    planner only offered 64, 128 and 256 workers."""
    model = skeleton("12b")
    cfg = training(num_workers=8, per_device_batch_size=8, gradient_accumulation_steps=2, precision="fp32")
    plan = plan_memory(model, HH, cfg, bf16=False)
    assert plan.deferred_gradients / GIB > 40 and plan.total > 80 * GIB
    lines = suggestions(model, HH, cfg, bf16=False, accelerator_bytes=80 * GIB)
    assert 1 <= len(lines) <= 4
    proposed = [changes(line) for line in lines]
    for change in proposed:
        workers = int(change.get("num_workers", 8))
        size = int(change.get("per_device_batch_size", 8))
        accumulation = int(change.get("gradient_accumulation_steps", 2))
        assert workers * size * accumulation == 8 * 8 * 2  # the global batch never changes
        assert workers == 8  # something fits without adding workers, so no line adds them
        candidate = cfg.model_copy(update={k: (v == "true" if v in ("true", "false") else None if v == "null" else
                                               int(v) if v.isdigit() else v) for k, v in change.items()})
        assert plan_memory(model, HH, candidate, bf16=candidate.precision == "bf16").total <= 0.9 * 80 * GIB
    knobs = [set(c) - {"gradient_accumulation_steps"} for c in proposed]
    assert all(not (a <= b) for i, a in enumerate(knobs) for j, b in enumerate(knobs) if i != j)  # each once
    assert any(c.get("defer_gradient_sync") == "false" for c in proposed)
    assert any("per_device_batch_size" in c and "precision" not in c for c in proposed)  # an fp32 fix exists


def test_when_nothing_fits_on_these_workers_the_fewest_workers_come_first():
    model = skeleton("12b")
    cfg = training(num_workers=1, per_device_batch_size=1, gradient_accumulation_steps=64, precision="bf16")
    lines = suggestions(model, HH, cfg, bf16=True, accelerator_bytes=80 * GIB)
    workers = [int(changes(line).get("num_workers", 1)) for line in lines]
    assert workers == sorted(workers) and workers[0] > 1
    for line in lines:  # the global batch of 64 pairs is kept: accumulation shrinks as workers grow
        change = changes(line)
        assert int(change["num_workers"]) * int(change.get("gradient_accumulation_steps", 64)) == 64


def test_a_global_batch_too_small_to_spread_says_so():
    model = skeleton("12b")
    cfg = training(num_workers=1, per_device_batch_size=1, gradient_accumulation_steps=2, precision="bf16")
    (line,) = suggestions(model, HH, cfg, bf16=True, accelerator_bytes=16 * GIB)  # not even the bf16 base (22 GiB)
    assert line.startswith("nothing fits") and "global batch of 2 pairs" in line and line.endswith("and LoRA")


def test_knobs_already_on_are_never_proposed():
    model = skeleton("2.8b")
    cfg = training(num_workers=4, per_device_batch_size=8, activation_checkpointing=True, precision="fp32")
    lines = suggestions(model, HH, cfg, bf16=False, accelerator_bytes=40 * GIB)
    assert lines and not any(knob in line for line in lines
                             for knob in ("activation_checkpointing", "logprob_chunk_tokens", "packing"))


def test_bf16_chunked_head_charge_is_the_buffers_the_backward_allocates():
    """bf16 autocast over fp32 weights: beyond the [chunk, V] temporaries the backward holds the fp32
    gradient, the weight's bf16 cast and the reused product buffer; the planner charges exactly
    their bytes (the fp32-only formula charged the gradient alone)."""
    import math

    from test_chunked import bf16_head_backward  # same directory (pytest puts it on sys.path)
    from trainers.model.memory import chunked_head_bytes

    n, h, v, chunk = 48, 128, 512, 16
    tracked, _ = bf16_head_backward(n, h, v, chunk)
    held = sum(math.prod(shape) * dtype.itemsize for shape, dtype in tracked.allocations
               if len(shape) == 2 and shape[-1] == h and shape[0] not in (chunk, n))  # the gradient, the cast, the buffer
    temporaries = chunk * v * 12
    assert chunked_head_bytes(chunk, v, h, weight_bytes=4, compute_bytes=2) - temporaries == held
    assert chunked_head_bytes(chunk, v, h, weight_bytes=4, compute_bytes=4) - temporaries == 4 * v * h
    assert chunked_head_bytes(chunk, v, h, weight_bytes=2, compute_bytes=2) - temporaries == 2 * v * h  # FSDP bf16 params


def test_lora_is_charged_as_the_adapters_peft_builds_on_a_frozen_base():
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from trainers.config import LoraConfig
    from trainers.model.lora import POLICY, REFERENCE, attach_adapters, is_adapter_key

    config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=50304)
    lora = LoraConfig(rank=4, alpha=8, base_dtype="bf16")
    real = attach_adapters(AutoModelForCausalLM.from_config(config), lora, "soft")
    policy_adapter = sum(p.numel() for n, p in real.named_parameters() if is_adapter_key(n) and f".{POLICY}." in n)
    reference_adapter = sum(p.numel() for n, p in real.named_parameters() if is_adapter_key(n) and f".{REFERENCE}." in n)
    base = sum(p.numel() for n, p in real.named_parameters() if not is_adapter_key(n))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    shape = MicroBatchShape(4096, 4096, "test")  # the head scored in chunks
    plan = plan_memory(meta, HH, training(), bf16=True, shape=shape, lora=lora)
    assert plan.policy_params == 2 * base + 4 * policy_adapter  # the bf16 base once, the fp32 adapter
    assert plan.gradients == 4 * policy_adapter and plan.optimizer == 8 * policy_adapter
    assert plan.reference == 4 * reference_adapter and reference_adapter == 8 * policy_adapter  # soft: 8r columns
    assert plan.initial == 0  # the base with adapters off
    full = plan_memory(meta, HH, training(), bf16=True, shape=shape)
    assert plan.activations == full.activations and plan.logits < full.logits  # a frozen head has no gradient
    hard = plan_memory(meta, HH, training(ref_update="hard", alpha=None), bf16=True, shape=shape, lora=lora)
    assert hard.reference == 4 * policy_adapter
    none = plan_memory(meta, HH, training(ref_update="none", alpha=None, tau=None), bf16=True, shape=shape, lora=lora)
    assert none.reference == 0


def test_the_pythia_12b_lora_example_fits_one_80gb_gpu_and_the_search_proposes_lora_when_nothing_else_fits():
    from pathlib import Path

    from orchestrator.config import load_experiment
    from trainers.model.memory import fits, plan_skeleton

    example = Path(__file__).resolve().parents[3] / "examples" / "hh_pythia12b_lora.yaml"
    config = load_experiment(str(example), [])
    model = plan_skeleton(config.model, None)
    plan = plan_memory(model, config.data, config.training, bf16=True, lora=config.model.lora)
    assert fits(plan, 80 * GIB) and plan.parameters > 11.8e9
    full = config.training.model_copy(update={"num_workers": 1})
    assert not fits(plan_memory(model, config.data, full, bf16=True), 80 * GIB)
    lines = suggestions(model, config.data, full, bf16=True, accelerator_bytes=80 * GIB, max_workers=1)
    assert lines and lines[0].startswith("model.lora={rank: 16, alpha: 32, base_dtype: bf16}"), lines
