"""Models on one or many workers: device, FSDP2 sharding found from the model, load-once building.

    every rank:  skeleton of policy / reference / frozen initial model on the meta device (no memory)
                 fully_shard each transformer block (the classes the model lists in _no_split_modules),
                 then the root; materialise only this rank's shards (to_empty)
    rank 0 only: read the weights once (from_pretrained, or the seeded tiny model)
    all ranks:   broadcast rank 0's tensors into the policy's shards; the reference and the initial
                 model get a shard-local copy of the policy's shards (no second read, no communication)

Why rank-0 broadcast rather than every rank reading its slices of the safetensors files: the
reading is done by ``from_pretrained``, which knows every checkpoint layout Hugging Face supports
(.bin and .safetensors, sharded or not, renamed and tied keys, dtype conversion); slice reading would
have to re-implement that per format. The cost is one full copy of the model in rank 0's host
memory during start-up (freed before training) and one broadcast per tensor.

Policy, reference and initial model are sharded identically, so their local shards line up one to
one: the TR-DPO update (``trainers.trdpo.soft_update_``) and the copies above are shard-local.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from trainers.config import ModelConfig
from trainers.model.build import ModelLoadError, build_policy, disable_dropout, load_pretrained, model_skeleton
from trainers.process_group import has_process_group, is_distributed

if TYPE_CHECKING:
    from trainers.model.lora import AdapterRoles


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def shards_models(shard_one_worker: bool = False) -> bool:
    """Whether models are FSDP2-sharded: always on several ranks; on one rank (a 1-rank mesh, the
    same DTensor code path) when ``training.shard_one_worker`` asks and a process group exists."""
    return is_distributed() or (shard_one_worker and has_process_group())


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "to_local") for p in model.parameters())


class DeviceTotals:
    """Base of the typed accumulators (a dataclass whose fields are scalar float64 tensors): sums
    stay on the device, and ``reduced()`` is one all-reduce over ranks and one host read, so a GPU
    is never stalled in the middle of a step."""

    @classmethod
    def zeros(cls, device):
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in fields(cls)))

    def add(self, **values) -> None:
        for name, value in values.items():
            value = value.detach().double().sum() if torch.is_tensor(value) else value
            setattr(self, name, getattr(self, name) + value)

    def reduced(self) -> dict[str, float]:
        return reduced_together(self)[0]


def reduced_together(*accumulators: DeviceTotals) -> list[dict[str, float]]:
    """Each accumulator's sums over ranks, in one all-reduce and one host read for all of them."""
    names = [[f.name for f in fields(acc)] for acc in accumulators]
    stacked = torch.stack([getattr(acc, name) for acc, these in zip(accumulators, names) for name in these])
    if is_distributed():
        dist.all_reduce(stacked)
    values = iter(stacked.tolist())
    return [{name: next(values) for name in these} for these in names]


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, found from the model itself: Hugging Face models name their
    block classes in ``_no_split_modules`` (GPTNeoXLayer, LlamaDecoderLayer, GPT2Block, ...).
    Only the outermost matches count (a block never contains another FSDP unit)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    if not blocks:
        listed = sorted(names) if names else "nothing"
        raise ModelLoadError(
            f"model {type(model).__name__}: cannot find its transformer blocks to shard "
            f"(its _no_split_modules lists {listed}, and no submodule has such a class)")
    return blocks


def shard(model: torch.nn.Module, mesh, bf16: bool) -> None:
    """FSDP2: each block is one unit, the root (embeddings, final norm, head) another.

    ``reshard_after_forward`` on the root too: a no_grad forward must not leave parameters
    gathered, or a shard-local update would write into a discarded full copy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


def local_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters this rank owns (DTensor local shards under FSDP2, full tensors otherwise)."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]


@torch.no_grad()
def copy_shards_(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """``target <- source`` for two models sharded alike: parameters and buffers, shard-local."""
    torch._foreach_copy_(local_tensors(target), local_tensors(source))
    for (name, buffer), (other_name, other) in zip(target.named_buffers(), source.named_buffers()):
        if name != other_name:
            raise RuntimeError(f"buffers differ between two models built alike: {name} vs {other_name}")
        buffer.copy_(other)


@torch.no_grad()
def load_from_rank0_(model: torch.nn.Module, source: torch.nn.Module | None) -> None:
    """Fill a sharded, materialised model from ``source`` (a full model held by rank 0 only):
    each tensor is broadcast once and every rank keeps its own shard. Buffers (rotary frequencies
    and the like, some of them not in the state dict) are broadcast whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    full = source.state_dict() if rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():
        if rank == 0:
            buffer.copy_(source.get_buffer(name))
        dist.broadcast(buffer, src=0)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass (Hugging Face's per-block
    checkpointing, non-reentrant so that it composes with FSDP2's hooks)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelLoadError(f"training.activation_checkpointing: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@dataclass
class Models:
    """The three models of a TR-DPO run. ``reference`` is None for SFT; ``initial`` (the frozen
    starting model, for the KL diagnostic) is the reference itself when the reference never moves."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    initial: torch.nn.Module | None
    # LoRA: policy, reference and initial are one PEFT model, these its roles (trainers.model.lora)
    roles: "AdapterRoles | None" = None


def build_models(model_cfg: ModelConfig, tokenizer, *, preference: bool, moving_reference: bool, device: torch.device,
                 bf16: bool, activation_checkpointing: bool = False, shard_one_worker: bool = False,
                 ref_update: str = "none", alpha: float | None = None) -> Models:
    """Policy (trainable), reference and initial model (frozen), built from one read of the weights;
    with ``model.lora`` one PEFT model serving all three (``ref_update`` and ``alpha`` its rule).

    Collective when distributed: every rank must call it."""
    if model_cfg.lora is not None:
        models = _build_lora_models(model_cfg, tokenizer, preference=preference, ref_update=ref_update, alpha=alpha,
                                    device=device, bf16=bf16, sharded=shards_models(shard_one_worker))
    elif not shards_models(shard_one_worker):
        policy = build_policy(model_cfg, tokenizer)
        reference = initial = None
        if preference:
            reference = (load_pretrained(model_cfg.reference_name_or_path, "model.reference_name_or_path", model_cfg)
                         if model_cfg.reference_name_or_path else copy.deepcopy(policy))
            initial = copy.deepcopy(reference) if moving_reference else reference
        # Module.to returns the module itself, so "initial is reference" survives the move.
        models = Models(*(m.to(device) if m is not None else None for m in (policy, reference, initial)))
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        rank = dist.get_rank()

        def sharded_skeleton(name_or_path: str | None = None) -> torch.nn.Module:
            model = model_skeleton(model_cfg, tokenizer, name_or_path)
            shard(model, mesh, bf16)
            model.to_empty(device=device)
            return model

        policy = sharded_skeleton()
        source = build_policy(model_cfg, tokenizer) if rank == 0 else None  # the one read of the weights
        load_from_rank0_(policy, source)
        del source
        reference = initial = None
        if preference:
            if model_cfg.reference_name_or_path:
                reference = sharded_skeleton(model_cfg.reference_name_or_path)
                source = (load_pretrained(model_cfg.reference_name_or_path, "model.reference_name_or_path", model_cfg)
                          if rank == 0 else None)
                load_from_rank0_(reference, source)
                del source
            else:
                reference = sharded_skeleton()
                copy_shards_(reference, policy)
            initial = reference
            if moving_reference:
                initial = sharded_skeleton(model_cfg.reference_name_or_path)
                copy_shards_(initial, reference)
        models = Models(policy, reference, initial)
    for frozen in {id(m): m for m in (models.reference, models.initial) if m is not None and m is not models.policy}.values():
        frozen.requires_grad_(False).eval()
    if not model_cfg.keep_dropout:  # the policy trains in train() mode: its dropout would make the rewards noise
        for model in {id(m): m for m in (models.policy, models.reference, models.initial) if m is not None}.values():
            disable_dropout(model)
    if activation_checkpointing:
        enable_activation_checkpointing(models.policy)
    models.policy.train()
    return models


# PEFT draws the policy adapter's A at random: from this seed, in a forked generator, so that the
# adapters are the same on every rank and in every run, and the run's own random stream is untouched.
ADAPTER_INIT_SEED = 0


def _adapted(model_cfg: ModelConfig, base: torch.nn.Module, ref_update: str) -> torch.nn.Module:
    from trainers.model.lora import attach_adapters

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ADAPTER_INIT_SEED)
        return attach_adapters(base, model_cfg.lora, ref_update)


def _build_lora_models(model_cfg: ModelConfig, tokenizer, *, preference: bool, ref_update: str, alpha: float | None,
                       device: torch.device, bf16: bool, sharded: bool) -> Models:
    """One base with the LoRA adapters (trainers.model.lora); under FSDP2 each block (frozen base
    weights and trainable adapters together) is one unit, filled from rank 0's one read."""
    from trainers.model.lora import AdapterRoles

    rule = ref_update if preference else "none"
    if not sharded:
        model = _adapted(model_cfg, build_policy(model_cfg, tokenizer), rule).to(device)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        model = _adapted(model_cfg, model_skeleton(model_cfg, tokenizer), rule)
        shard(model, mesh, bf16)
        model.to_empty(device=device)
        source = _adapted(model_cfg, build_policy(model_cfg, tokenizer), rule) if dist.get_rank() == 0 else None
        load_from_rank0_(model, source)
        del source
    roles = AdapterRoles.for_run(model, model_cfg.lora, rule, alpha) if preference else None
    return Models(model, model if preference else None, model if preference else None, roles)
