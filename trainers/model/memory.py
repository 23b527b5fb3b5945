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

Working memory is an estimate, for the largest micro-batch: ``T`` positions through the blocks
(padded: 2B x the longest sequence; packed: the token budget, or less when the data is known),
``N`` of them predicting a response token, hidden h, vocab V, n blocks, compute dtype of c bytes:

    activations     without checkpointing: n x T x h x (A x c)   (A = 17 per token and hidden unit
                                           in 16-bit, after Korthikanti et al. 2022 with attention
                                           scores not kept; calibrated on CPU, benchmarks/memory.py)
                    with checkpointing:    n x T x h x c  +  one block's T x h x (A x c)
    logits          whole, padded: T x V x 20 + T x V x 8   fp32 logits, log-sum-exp temporaries and
                                                   gradients, and the reference pass's
                    whole, packed: T x V x 4 + N x V x 8    every position's logits for a moment,
                                                   the label positions' rows kept
                    chunked:       C x V x 12 + w x V x h   one chunk's logits (C = min(chunk, N)),
                                                   and the head-gradient accumulator in the
                                                   weight's dtype (w: 4, or c under FSDP's bf16
                                                   parameters); bf16 autocast over fp32 weights
                                                   (one worker) adds the weight's bf16 cast and the
                                                   reused product buffer: 2 x V x h + 2 x min(C x V, V x h)
                    chunked head, small logits (``scores_whole``: N <= chunk or N x V x 4 under
                                   64 MiB): N x V x 12      the label rows scored whole
    gathered units  (2 blocks + root) x c    the all-gathered parameters FSDP holds while computing

With ``model.lora`` the base is frozen and serves every role (no reference or initial copy):

    frozen base            b x shard            b = 2 (``lora.base_dtype: bf16``) or 4
    policy adapter         4 x a                a: r x (in + out) per adapted linear layer of the
                                                blocks, sharded like the weights; fp32, with its
                                                gradients (4 x a) and AdamW state (8 x a)
    reference adapter      4 x a_ref            reference_rank columns (soft: 8r by default; hard: r)
    head gradient          none                 the output embedding is frozen

The activations are charged as for full fine-tuning: the frozen blocks still keep their inputs for
the gradients that flow through them to the adapters (measured: the same bytes per position as full
fine-tuning), and the adapters add nothing of ``[tokens, out]`` size (their delta is summed into
the base output in place, ``trainers.model.lora.fused_lora_forward``).

``trdpo plan`` also searches the knobs for the cheapest settings that fit (``suggestions``),
LoRA among them when full fine-tuning fits nowhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainers.config import DataConfig, LoraConfig, ModelConfig, TrainingConfig
from trainers.trdpo.chunked import scores_whole

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
    micro_batch: str = ""  # how the micro-batch's size was found
    chunked_logprobs: bool = False
    lora: str = ""  # e.g. "rank 16, bf16 base": the parameters are the frozen base plus the adapters

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
        if self.lora:
            return [(f"base + adapters (LoRA {self.lora})", self.policy_params), ("adapter gradients (fp32)", self.gradients),
                    ("adapter AdamW state (fp32)", self.optimizer), ("reference adapter (fp32)", self.reference),
                    ("deferred unsharded gradients", self.deferred_gradients), ("activations (estimate)", self.activations),
                    (f"{'log-prob chunks' if self.chunked_logprobs else 'logits'} (estimate)", self.logits),
                    ("gathered FSDP units (estimate)", self.gathered)]
        return [("policy parameters (fp32)", self.policy_params), ("policy gradients (fp32)", self.gradients),
                ("AdamW state (fp32)", self.optimizer), ("reference (fp32)", self.reference),
                ("initial model (fp32)", self.initial), ("deferred unsharded gradients", self.deferred_gradients),
                ("activations (estimate)", self.activations), (f"{'log-prob chunks' if self.chunked_logprobs else 'logits'} (estimate)", self.logits),
                ("gathered FSDP units (estimate)", self.gathered)]


def shard_elements(shape: torch.Size, world: int) -> int:
    """Elements rank 0 holds of a tensor FSDP2 shards over ``world`` ranks (dim 0, ceil split)."""
    if world == 1 or len(shape) == 0:
        return math.prod(shape)
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


@dataclass(frozen=True)
class MicroBatchShape:
    """The largest micro-batch a run computes: positions through the blocks (padding included) and
    positions that predict a response token (the chunked head's work)."""

    positions: int
    label_positions: int
    source: str  # how it was found, for the printout


# Bytes of saved activations per token and hidden unit per block, in units of the compute dtype's
# size (Korthikanti et al. 2022: 34 bytes in 16-bit, i.e. 17 x 2, with attention scores not kept).
ACTIVATION_FACTOR = 17


def worst_case_shape(data: DataConfig, training: TrainingConfig) -> MicroBatchShape:
    """Without the data: a padded micro-batch at full length, or a packed one filled to its budget."""
    from trainers.data.batching import micro_batch_budget

    sequences = 2 if training.stage == "trdpo" else 1
    if training.packing:
        budget = micro_batch_budget(training, data.max_length)
        return MicroBatchShape(budget, budget, f"packed, at most {budget} tokens")
    slots = sequences * training.per_device_batch_size * data.max_length
    return MicroBatchShape(slots, slots, f"padded, {sequences * training.per_device_batch_size} x {data.max_length}")


def measured_shape(pairs: list, data: DataConfig, training: TrainingConfig, world: int, steps: int = 64,
                   seed: int = 0) -> MicroBatchShape:
    """The largest micro-batch over ``steps`` global batches drawn from ``pairs`` (tokenized), cut as
    the loop cuts them: the length profile of real data instead of the worst case."""
    import random

    from trainers.data.batching import collate, packed_micro_batches, micro_batch_budget

    chosen_only = training.stage != "trdpo"
    global_batch = training.per_device_batch_size * world * training.gradient_accumulation_steps
    rng = random.Random(seed)
    positions = labels = 0
    for _ in range(steps):
        batch = rng.sample(pairs, min(global_batch, len(pairs)))
        if training.packing:
            micro = [m.pairs for m in packed_micro_batches(batch, micro_batch_budget(training, data.max_length), 0, 1,
                                                            chosen_only)]
        else:
            size = training.per_device_batch_size
            micro = [batch[i:i + size] for i in range(0, len(batch), size)]
        for pairs_of_micro in micro:
            tokens = collate(pairs_of_micro, 0, training, data.max_length, chosen_only)
            positions = max(positions, tokens.num_slots)
            labels = max(labels, int((tokens.labels[:, 1:] >= 0).sum()))
    layout = "packed" if training.packing else "padded"
    return MicroBatchShape(positions, labels, f"{layout}, largest of {steps} sampled steps of the data")


def chunked_head_bytes(chunk: int, vocab: int, hidden: int, weight_bytes: int, compute_bytes: int) -> int:
    """What ``trainers.trdpo.chunked``'s backward (its peak) holds beyond its inputs, for a head
    weight of ``weight_bytes`` per element computed in ``compute_bytes``: the weight's gradient
    (``[V, H]`` in the weight's dtype); ``[chunk, V]`` fp32 temporaries (the logits, the softmax's
    gradient built in place, its cast to the compute dtype, the next chunk's logits: 8 bytes
    measured, 12 as calibrated on the end-to-end peak, benchmarks/memory.py); and, when the compute
    dtype is narrower than the weight's (bf16 autocast over fp32 master weights, one worker), the
    weight's cast (``[V, H]``) and the reused product buffer (``min(chunk x V, V x H)`` elements)."""
    held = chunk * vocab * 12 + weight_bytes * vocab * hidden
    if compute_bytes != weight_bytes:
        held += compute_bytes * vocab * hidden + compute_bytes * min(chunk * vocab, vocab * hidden)
    return held


def adapted_linears(skeleton: torch.nn.Module, lora: LoraConfig) -> list[torch.nn.Linear]:
    """The linear layers of the blocks that get adapters: every one for ``all-linear``, else those
    whose name ends in one of ``target_modules``."""
    from trainers.model.sharding import transformer_blocks

    targets = None if lora.target_modules == "all-linear" else (
        [lora.target_modules] if isinstance(lora.target_modules, str) else list(lora.target_modules))
    return [m for block in transformer_blocks(skeleton) for name, m in block.named_modules()
            if isinstance(m, torch.nn.Linear) and (targets is None or name.split(".")[-1] in targets)]


def adapter_elements(layers: list[torch.nn.Linear], rank: int, world: int) -> int:
    """Rank 0's elements of one adapter of ``rank`` on ``layers`` (A: rank x in, B: out x rank; FSDP2
    shards dim 0 like every tensor)."""
    return sum(shard_elements(torch.Size([rank, m.in_features]), world) + shard_elements(torch.Size([m.out_features, rank]), world)
               for m in layers)


def plan_memory(skeleton: torch.nn.Module, data: DataConfig, training: TrainingConfig, bf16: bool,
                shape: MicroBatchShape | None = None, lora: LoraConfig | None = None) -> MemoryPlan:
    """The per-worker plan for ``skeleton`` (a meta-device model) trained as ``training`` says;
    ``shape``: the largest micro-batch, if known from the data (else the worst case); ``lora``:
    the run's ``model.lora`` (adapters on a frozen base)."""
    from trainers.model.sharding import transformer_blocks

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
    shape = shape or worst_case_shape(data, training)
    per_block = shape.positions * hidden * ACTIVATION_FACTOR * compute
    if training.activation_checkpointing:
        activations = len(blocks) * shape.positions * hidden * compute + per_block
    else:
        activations = len(blocks) * per_block
    if training.logprob_chunk_tokens and scores_whole(shape.label_positions, vocab, training.logprob_chunk_tokens):
        logits = max(1, shape.label_positions) * vocab * 12  # the label rows' logits, log-softmax and gradient
    elif training.logprob_chunk_tokens:
        chunk = min(training.logprob_chunk_tokens, max(1, shape.label_positions))
        if lora is not None:  # a frozen head: no weight gradient, no cast kept for it
            logits = chunk * vocab * 12
        else:
            logits = chunked_head_bytes(chunk, vocab, hidden, weight_bytes=compute if world > 1 else 4, compute_bytes=compute)
    elif training.packing:  # whole logits of every position, then only the label positions' rows kept
        logits = shape.positions * vocab * 4 + shape.label_positions * vocab * 8
    else:  # measured on CPU: ~20 bytes per position and vocabulary entry for the policy's pass
        logits = shape.positions * vocab * 20 + (shape.positions * vocab * 8 if preference else 0)
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root_params = sum(p.numel() for p in params if id(p) not in in_blocks)
    gathered = (2 * block_params + root_params) * compute if world > 1 else 0
    if lora is not None:
        from trainers.model.lora import reference_rank

        layers = adapted_linears(skeleton, lora)
        adapter = adapter_elements(layers, lora.rank, world)
        ref_rank = reference_rank(lora, training.ref_update) if preference else None
        base_bytes = 2 if lora.base_dtype == "bf16" else 4
        deferred = adapter * compute if deferred else 0
        return MemoryPlan(world, total + adapter_elements(layers, lora.rank, 1), base_bytes * shard + 4 * adapter, 4 * adapter,
                          8 * adapter, 4 * adapter_elements(layers, ref_rank, world) if ref_rank else 0, 0, deferred,
                          activations, logits, gathered, shape.source, bool(training.logprob_chunk_tokens),
                          f"r{lora.rank}, {lora.base_dtype}")
    return MemoryPlan(world, total, 4 * shard, 4 * shard, 8 * shard, 4 * shard if preference else 0,
                      4 * shard if moving else 0, deferred, activations, logits, gathered, shape.source,
                      bool(training.logprob_chunk_tokens))


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
    unit, size = ("GiB", GIB) if plan.total >= GIB else ("MiB", 2**20)
    lines = [f"{plan.parameters / 1e9:.2f}B parameters on {plan.world} worker(s); micro-batch: {plan.micro_batch}; "
             f"per worker (rank 0):"]
    lines += [f"  {name:<32} {value / size:9.2f} {unit}" for name, value in plan.rows() if value]
    lines.append(f"  {'model states':<32} {plan.model_states / size:9.2f} {unit}")
    lines.append(f"  {'total (estimate)':<32} {plan.total / size:9.2f} {unit}")
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

    from trainers.compat import dtype_argument
    from trainers.model.build import architecture_config

    config = known_architecture(model.name_or_path) if model.name_or_path else None
    if config is None:
        config = architecture_config(model, tokenizer_factory() if model.tiny is not None else None)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code,
                                                 **dtype_argument(torch.float32))


# Rough step-time factors of each change, for ranking the ways to fit (fewest workers first): what
# a change costs in throughput at the same number of workers.
COSTS = {
    "logprob_chunk_tokens": 1.0,  # the head's matmul twice, but only on response positions: about even
    "packing": 0.8,  # no compute on padding
    "precision": 0.6,  # bf16 on a GPU: faster, and the numerics change (the reference stays fp32)
    "defer_gradient_sync": 1.05,  # a reduce-scatter per micro-batch instead of per step
    "activation_checkpointing": 1.33,  # the blocks' forward again in the backward
}
MICRO_BATCH_COST = 1.08  # per halving of the micro-batch (same global batch, smaller matmuls)


def _candidates(training: TrainingConfig, bf16: bool, max_workers: int):
    """Every combination of the knobs that keeps the global batch (pairs per optimizer step)."""
    import itertools

    global_batch = training.per_device_batch_size * training.num_workers * training.gradient_accumulation_steps
    workers = [w for w in (training.num_workers * 2**k for k in range(9)) if w <= max(max_workers, training.num_workers)]
    sizes = [training.per_device_batch_size // 2**k for k in range(8) if training.per_device_batch_size // 2**k >= 1]
    toggles = [
        ("activation_checkpointing", [False, True] if not training.activation_checkpointing else [True]),
        ("defer_gradient_sync", [True, False] if training.defer_gradient_sync else [False]),
        ("precision", ["bf16", None] if not bf16 else [None]),
        ("logprob_chunk_tokens", [1024, None] if not training.logprob_chunk_tokens else [None]),
        ("packing", [True, None] if not training.packing else [None]),
    ]
    for w, size, *values in itertools.product(workers, dict.fromkeys(sizes), *(v for _, v in toggles)):
        if global_batch % (w * size):
            continue  # this many workers and this micro-batch cannot make the same global batch
        change: dict = {}
        if w != training.num_workers:
            change["num_workers"] = w
        if size != training.per_device_batch_size:
            change["per_device_batch_size"] = size
        accumulation = global_batch // (w * size)
        if accumulation != training.gradient_accumulation_steps:
            change["gradient_accumulation_steps"] = accumulation
        for (name, _), value in zip(toggles, values):
            if value is not None and value != getattr(training, name):
                change[name] = value
        yield change


# What the fit search proposes when full fine-tuning fits nowhere: LoRA on every linear layer of
# the blocks, on a bf16 base (the common setting; it computes under bf16 autocast).
PROPOSED_LORA = LoraConfig(rank=16, alpha=32, base_dtype="bf16")


def suggestions(skeleton: torch.nn.Module, data: DataConfig, training: TrainingConfig, bf16: bool,
                accelerator_bytes: int, max_workers: int = 256, shape: MicroBatchShape | None = None,
                limit: int = 4, lora: LoraConfig | None = None) -> list[str]:
    """The changes that fit, each once: fewest workers first, then the fewest knobs turned, then the
    least throughput cost; a change that only adds workers or knobs to one already listed is left
    out. The global batch (pairs per optimizer step) never changes. When no change fits full
    fine-tuning (``lora`` None), LoRA adapters on a bf16 base are searched the same way."""
    def show(value) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    def shown(changes: list[dict]) -> list[str]:
        return [", ".join(f"training.{k}={show(v)}" for k, v in change.items()) for change in changes]

    found = _fitting_changes(skeleton, data, training, bf16, accelerator_bytes, max_workers, shape, limit, lora)
    if found:
        return shown(found)
    if lora is None:
        forced = {"precision": "bf16"} if not bf16 else {}
        as_lora = training.model_copy(update=forced)
        if fits(plan_memory(skeleton, data, as_lora, True, shape, PROPOSED_LORA), accelerator_bytes):
            found = [forced]
        else:
            found = [{**forced, **c} for c in _fitting_changes(skeleton, data, as_lora, True, accelerator_bytes, max_workers,
                                                               shape, limit, PROPOSED_LORA)]
        if found:
            lora_line = f"model.lora={{rank: {PROPOSED_LORA.rank}, alpha: {PROPOSED_LORA.alpha:g}, base_dtype: {PROPOSED_LORA.base_dtype}}}"
            return [", ".join(filter(None, [lora_line, line])) for line in shown(found)]
    global_batch = training.per_device_batch_size * training.num_workers * training.gradient_accumulation_steps
    most = min(max_workers, global_batch)
    return [f"nothing fits keeping the global batch of {global_batch} pairs (so at most {most} workers), with any "
            f"micro-batch down to 1, activation checkpointing, bf16, chunked log-probs{'' if lora else ' and LoRA'}"]


def _fitting_changes(skeleton: torch.nn.Module, data: DataConfig, training: TrainingConfig, bf16: bool,
                     accelerator_bytes: int, max_workers: int, shape: MicroBatchShape | None, limit: int,
                     lora: LoraConfig | None) -> list[dict]:
    scored = []
    for change in _candidates(training, bf16, max_workers):
        if not change:
            continue
        candidate = training.model_copy(update=change)
        use_bf16 = bf16 or change.get("precision") == "bf16"
        if not fits(plan_memory(skeleton, data, candidate, use_bf16, shape if "packing" not in change else None, lora),
                    accelerator_bytes):
            continue
        cost = 1.0
        for name, factor in COSTS.items():
            if name in change:
                cost *= factor
        halvings = (training.per_device_batch_size // candidate.per_device_batch_size).bit_length() - 1
        cost *= MICRO_BATCH_COST ** halvings
        knobs = frozenset(change) - {"num_workers", "gradient_accumulation_steps"}  # accumulation follows the rest
        scored.append((candidate.num_workers, len(knobs), cost, knobs, change))
    scored.sort(key=lambda item: item[:3])  # fewest workers, then fewest knobs turned, then the cheapest
    chosen: list[tuple[int, frozenset]] = []
    out: list[dict] = []
    for workers, _, _, knobs, change in scored:
        if any(kept_knobs <= knobs and kept_workers <= workers for kept_workers, kept_knobs in chosen):
            continue  # it only adds workers or knobs to one already listed
        chosen.append((workers, knobs))
        out.append(change)
        if len(out) == limit:
            break
    return out


def data_shape(model: ModelConfig, tokenizer_config, data: DataConfig, training: TrainingConfig,
               limit: int = 4000) -> tuple[MicroBatchShape | None, str]:
    """The largest micro-batch on the data itself (its first ``limit`` training pairs, tokenized),
    when the data and the tokenizer are local; else ``(None, why)``: the plan then takes the
    worst case. Reads nothing from the network."""
    from pathlib import Path

    from trainers.data.loading import load_examples, tokenize_examples
    from trainers.data.types import LoadReport
    from trainers.model.build import build_tokenizer
    from trainers.state.storage import is_remote

    if data.hf_dataset and not Path(data.hf_dataset).expanduser().exists():
        return None, f"data.hf_dataset {data.hf_dataset!r} is on the Hub"
    source = tokenizer_config.name_or_path or model.name_or_path
    if tokenizer_config.kind != "byte" and model.tiny is None and (is_remote(source) or not Path(source).expanduser().exists()):
        return None, f"the tokenizer {source!r} is not a local directory"
    sample = data.model_copy(update={"max_examples": min(limit, data.max_examples or limit), "on_bad_row": "skip"})
    examples, _ = load_examples(sample, "train")
    tokenizer = build_tokenizer(model, tokenizer_config)
    pairs = tokenize_examples(examples, tokenizer, sample, "plan", LoadReport("plan", kept=len(examples)))
    if not pairs:
        return None, "no usable pairs in the data"
    return measured_shape(pairs, data, training, training.num_workers), ""
