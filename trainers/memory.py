"""Per-worker memory of a training run, planned before launch from the model's config alone.

Model states are exact: the parameter shapes come from a meta-device skeleton of the architecture
(no weights), and each tensor is charged as FSDP2 shards it (dim 0 split in ``world`` chunks; rank
0 holds the largest). Per worker, in bytes:

    policy parameters      4 x shard            fp32 master weights
    policy gradients       4 x shard            fp32, reduce-scattered
    AdamW state            8 x shard            exp_avg + exp_avg_sq in fp32
    reference              4 x shard            fp32 (a bf16 reference rounds small soft updates away)
    initial model          4 x shard            only while the reference moves (KL diagnostic)
    deferred gradients     c x full params      only with accumulation > 1 on > 1 worker and
                                                training.defer_gradient_sync: unsharded gradients
                                                in the compute dtype (c bytes) between micro-batches

Working memory is an estimate (activations depend on kernels): for micro-batch B pairs, i.e.
2B sequences of length L, hidden h, vocab V, n blocks, compute dtype of c bytes,

    activations     without checkpointing: n x 2B x L x h x 17c   (Korthikanti et al. 2022's 34 bytes
                                           per token and hidden unit at 16 bits, attention scores not
                                           kept: SDPA / flash kernels)
                    with checkpointing:    n x 2B x L x h x c  +  one block's 2B x L x h x 17c
    logits          2B x L x V x 12          fp32 logits, log-softmax and their gradient
    reference pass  2B x L x V x 8           no_grad logits and log-softmax
    gathered units  (2 blocks + root) x c    the all-gathered parameters FSDP holds while computing

Measured on CPU (``system/model_state_mb_rank0``) the model states agree with this plan to a few
bytes (tests/integration/test_plan.py); the working-memory estimate is a planning figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainers.config import DataConfig, ModelConfig, TrainingConfig

GIB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    world: int
    parameters: int  # total parameter count of the model
    policy_params: int  # bytes per worker (rank 0)
    gradients: int
    optimizer: int
    reference: int
    initial: int
    deferred_gradients: int
    activations: int
    logits: int
    gathered: int

    @property
    def model_states(self) -> int:
        """What training measures as system/model_state_mb_rank0 (parameters, gradients, AdamW,
        reference, initial model: the sharded, persistent part)."""
        return self.policy_params + self.gradients + self.optimizer + self.reference + self.initial

    @property
    def working(self) -> int:
        return self.deferred_gradients + self.activations + self.logits + self.gathered

    @property
    def total(self) -> int:
        return self.model_states + self.working

    def rows(self) -> list[tuple[str, int]]:
        return [("policy parameters (fp32)", self.policy_params), ("policy gradients (fp32)", self.gradients),
                ("AdamW state (fp32)", self.optimizer), ("reference (fp32)", self.reference),
                ("initial model (fp32)", self.initial), ("deferred unsharded gradients", self.deferred_gradients),
                ("activations (estimate)", self.activations), ("logits (estimate)", self.logits),
                ("gathered FSDP units (estimate)", self.gathered)]


def shard_elements(shape: torch.Size, world: int) -> int:
    """Elements rank 0 holds of a tensor FSDP2 shards over ``world`` ranks (dim 0, ceil split)."""
    if world == 1 or len(shape) == 0:
        return math.prod(shape)
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def plan_memory(skeleton: torch.nn.Module, data: DataConfig, training: TrainingConfig, bf16: bool) -> MemoryPlan:
    """The per-worker plan for ``skeleton`` (a meta-device model) trained as ``training`` says."""
    from trainers.distributed import transformer_blocks

    world = training.num_workers
    params = list({id(p): p for p in skeleton.parameters()}.values())  # tied weights once
    total = sum(p.numel() for p in params)
    shard = sum(shard_elements(p.shape, world) for p in params)
    preference = training.stage == "trdpo"
    moving = preference and training.ref_update != "none"
    compute = 2 if bf16 else 4
    deferred = total * compute if (world > 1 and training.gradient_accumulation_steps > 1 and training.defer_gradient_sync) else 0

    config = skeleton.config
    hidden = config.hidden_size
    vocab = config.vocab_size
    blocks = transformer_blocks(skeleton)
    tokens = 2 * training.per_device_batch_size * data.max_length if preference else training.per_device_batch_size * data.max_length
    per_block = tokens * hidden * 17 * compute
    if training.activation_checkpointing:
        activations = len(blocks) * tokens * hidden * compute + per_block
    else:
        activations = len(blocks) * per_block
    logits = tokens * vocab * 12 + (tokens * vocab * 8 if preference else 0)
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root_params = sum(p.numel() for p in params if id(p) not in in_blocks)
    gathered = (2 * block_params + root_params) * compute if world > 1 else 0
    return MemoryPlan(world, total, 4 * shard, 4 * shard, 8 * shard, 4 * shard if preference else 0,
                      4 * shard if moving else 0, deferred, activations, logits, gathered)


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``81920MiB``, ``1.5TiB`` -> bytes (GB = 10^9, GiB = 2^30)."""
    import re

    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.I)
    if not match:
        raise ValueError(f"{text!r}: expected a size such as 80GiB or 141GB")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1024 if binary else 1000
    return int(number * base ** " KMGT".index(unit or " "))


def fits(plan: MemoryPlan, accelerator_bytes: int, reserve_fraction: float = 0.1) -> bool:
    """Whether the plan fits, keeping ``reserve_fraction`` free for the CUDA context, NCCL buffers
    and allocator fragmentation."""
    return plan.total <= accelerator_bytes * (1 - reserve_fraction)


def describe(plan: MemoryPlan, model: ModelConfig, accelerator_bytes: int | None) -> str:
    lines = [f"{plan.parameters / 1e9:.2f}B parameters on {plan.world} worker(s); per worker (rank 0):"]
    lines += [f"  {name:<32} {value / GIB:9.2f} GiB" for name, value in plan.rows() if value]
    lines.append(f"  {'model states':<32} {plan.model_states / GIB:9.2f} GiB")
    lines.append(f"  {'total (estimate)':<32} {plan.total / GIB:9.2f} GiB")
    if accelerator_bytes:
        verdict = "fits" if fits(plan, accelerator_bytes) else "does NOT fit"
        lines.append(f"{verdict} in {accelerator_bytes / GIB:.0f} GiB per accelerator (10% kept free)")
    return "\n".join(lines)


# The Pythia suite (GPT-NeoX; Biderman et al. 2023), the paper's models: hidden size, blocks,
# attention heads, MLP width, vocabulary. From the public configs; a skeleton built from these
# reproduces the published parameter counts exactly (410M: 405,334,016 ... 12B: 11,846,072,320).
PYTHIA = {
    "70m": (512, 6, 8, 2048, 50304), "160m": (768, 12, 12, 3072, 50304), "410m": (1024, 24, 16, 4096, 50304),
    "1b": (2048, 16, 8, 8192, 50304), "1.4b": (2048, 24, 16, 8192, 50304), "2.8b": (2560, 32, 32, 10240, 50304),
    "6.9b": (4096, 32, 32, 16384, 50432), "12b": (5120, 36, 40, 20480, 50688),
}


def known_architecture(name: str):
    """A shipped config for ``EleutherAI/pythia-<size>[-deduped]`` (no download), else None."""
    import re

    match = re.fullmatch(r"(?:EleutherAI/)?pythia-([0-9.]+[mb])(?:-deduped)?(?:-v0)?", name.strip(), re.I)
    if not match or match.group(1).lower() not in PYTHIA:
        return None
    from transformers import GPTNeoXConfig

    hidden, layers, heads, mlp, vocab = PYTHIA[match.group(1).lower()]
    return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                         vocab_size=vocab, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
                         tie_word_embeddings=False)


def plan_skeleton(model: ModelConfig, tokenizer_factory) -> torch.nn.Module:
    """The meta-device skeleton ``trdpo plan`` measures: the tiny config, a local directory's
    config.json, a shipped Pythia config, or (last) the Hub's config.json alone."""
    from transformers import AutoModelForCausalLM

    from trainers.models import architecture_config

    config = known_architecture(model.name_or_path) if model.name_or_path else None
    if config is None:
        config = architecture_config(model, tokenizer_factory() if model.tiny is not None else None)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code, dtype=torch.float32)


def suggestions(skeleton: torch.nn.Module, data: DataConfig, training: TrainingConfig, bf16: bool,
                accelerator_bytes: int, max_workers: int = 256) -> list[str]:
    """Settings that would fit: activation checkpointing, then the fewest workers (with and
    without it), then a smaller micro-batch with more accumulation."""
    out = []
    options = [{"activation_checkpointing": True}] if not training.activation_checkpointing else []
    for workers in (2**k for k in range(1, 9)):
        if workers > training.num_workers and workers <= max_workers:
            options += [{"num_workers": workers}, {"num_workers": workers, "activation_checkpointing": True}]
    if training.per_device_batch_size > 1:
        options.append({"per_device_batch_size": 1,
                        "gradient_accumulation_steps": training.gradient_accumulation_steps * training.per_device_batch_size,
                        "activation_checkpointing": True})
    seen_workers = set()
    for change in options:
        candidate = training.model_copy(update=change)
        workers = change.get("num_workers")
        if workers in seen_workers:
            continue
        if fits(plan_memory(skeleton, data, candidate, bf16), accelerator_bytes):
            out.append(", ".join(f"training.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items()))
            if workers:
                seen_workers.add(workers)
            if len(out) == 3:
                break
    return out or ["no combination of up to 256 workers, activation checkpointing and micro-batch 1 fits"]
