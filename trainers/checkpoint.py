"""Training-state checkpoints: policy, reference, optimizer, scheduler, step, RNG, updater state.

The state is gathered to full (unsharded) tensors and written by rank 0 as one ``state.pt``.
Why full rather than sharded: a full checkpoint resumes on any number of workers, and the files
are plain torch tensors that tests and tools can compare. It costs one gather per checkpoint and
rank 0 must hold the full state in CPU memory, which is fine up to a few billion parameters; past
that a sharded (torch.distributed.checkpoint) format is the next step.

The data position needs no separate field: the batch order is a pure function of (seed, step).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

STATE_FILE = "state.pt"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (on every rank when not distributed; rank 0 only otherwise)."""
    if not _distributed():
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_training_state(
    directory: Path, *, policy, reference, optimizer, scheduler, step: int, updater_state: dict, extra: dict
) -> None:
    """Collective when distributed: every rank must call it; rank 0 writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {
        "policy": full_model_state(policy),
        "reference": full_model_state(reference) if reference is not None else None,
        "optimizer": get_optimizer_state_dict(policy, optimizer, options=options) if _distributed() else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "updater": updater_state,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        **extra,
    }
    if not _distributed() or dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(directory / STATE_FILE)  # never leave a half-written state.pt behind


def load_training_state(directory: Path, *, policy, reference, optimizer, scheduler) -> dict:
    """Restore everything in place; returns the remaining fields (step, updater, extras)."""
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if _distributed() else StateDictOptions()
    if _distributed():
        set_model_state_dict(policy, state["policy"], options=options)
        if reference is not None:
            set_model_state_dict(reference, state["reference"], options=options)
        set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=options)
    else:
        policy.load_state_dict(state["policy"])
        if reference is not None:
            reference.load_state_dict(state["reference"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state
