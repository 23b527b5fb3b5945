"""Export the trained policy as a Hugging Face model directory (safetensors, sharded with an index
for large models) that ``AutoModelForCausalLM.from_pretrained`` loads, with its tokenizer.

Under FSDP the full weights are gathered to rank 0's CPU once (every rank takes part); rank 0 then
holds exactly one full model, which Hugging Face's ``save_pretrained`` writes shard by shard from
a meta-device skeleton of the architecture (it carries the config and the tied-weight
conventions, and no second copy of the weights).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from trainers.config import ModelConfig
from trainers.model.sharding import is_sharded
from trainers.model.build import model_skeleton
from trainers.process_group import is_distributed
from trainers.state.storage import Storage

MAX_SHARD_SIZE = "2GB"


def full_policy_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU: on rank 0 under FSDP (empty elsewhere), on the one process
    otherwise. Collective under FSDP."""
    if not is_sharded(policy):
        return {k: v.detach().cpu() for k, v in policy.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_policy(policy: torch.nn.Module, model_cfg: ModelConfig, tokenizer, store: Storage, name: str, rank: int,
                  max_shard_size: str = MAX_SHARD_SIZE) -> str:
    """Write the policy to ``store/name``; returns its URI. Collective under FSDP. A LoRA policy is
    written merged (``W + s·B·A``): a plain Hugging Face model.

    ``config.json`` is uploaded last, so a directory with a config always has all its weights."""
    state = full_policy_state(policy)
    if model_cfg.lora is not None and state:
        from trainers.model.lora import POLICY, merged_weights

        state = merged_weights(state, POLICY, model_cfg.lora.alpha / model_cfg.lora.rank)
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="trdpo-export-") as tmp:
            save_model_dir(state, model_cfg, tokenizer, Path(tmp), max_shard_size)
            del state
            store.remove(name)
            upload_model_dir(Path(tmp), store, name)
    if is_distributed():
        dist.barrier()
    return store.uri_of(name)


def save_model_dir(state: dict[str, torch.Tensor], model_cfg: ModelConfig, tokenizer, directory: Path,
                   max_shard_size: str = MAX_SHARD_SIZE) -> None:
    """``state`` (plain names, full tensors) and the tokenizer as a Hugging Face model directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_skeleton(model_cfg, tokenizer).save_pretrained(directory, state_dict=state, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(directory)


def upload_model_dir(directory: Path, store: Storage, *parts: str) -> None:
    """Copy ``directory`` to ``store/parts`` with its ``config.json`` last, so that a directory
    with a config always has all its weights."""
    config = directory / "config.json"
    config_text = config.read_text(encoding="utf-8")
    config.unlink()  # held back: everything else goes first
    store.put_dir(directory, *parts)
    store.write_text(config_text, *parts, "config.json")
