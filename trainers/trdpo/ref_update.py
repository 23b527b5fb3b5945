"""When and how the TR-DPO reference moves.

Steps count optimizer steps from 1. With period ``tau`` the reference is updated after optimizer
steps ``tau, 2*tau, 3*tau, ...`` and never in between (``tau = 1``: after every step):

    soft:  ref <- alpha * policy + (1 - alpha) * ref      (torch._foreach_lerp_, exact at alpha 0 and 1)
    hard:  ref <- policy                                  (torch._foreach_copy_)
    none:  never (vanilla DPO)

The functions take *lists of tensors* and work in place. Under FSDP2 the policy and reference are
sharded identically, so calling them on the local shards of each worker is the whole update: no
gather and no communication. Keep the reference in float32 (the master dtype): a bf16 reference
rounds away small soft updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Sequence

import torch


class RefUpdateMode(str, Enum):
    NONE = "none"
    SOFT = "soft"
    HARD = "hard"


def _check_pairs(ref: Sequence[torch.Tensor], policy: Sequence[torch.Tensor]) -> None:
    if len(ref) != len(policy):
        raise ValueError(f"reference has {len(ref)} tensors but policy has {len(policy)}")
    for i, (r, p) in enumerate(zip(ref, policy)):
        if r.shape != p.shape:
            raise ValueError(f"tensor {i}: reference shape {tuple(r.shape)} != policy shape {tuple(p.shape)}")


@torch.no_grad()
def soft_update_(ref: Sequence[torch.Tensor], policy: Sequence[torch.Tensor], alpha: float) -> None:
    """``ref <- alpha * policy + (1 - alpha) * ref`` in place, one fused pass per tensor group."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_pairs(ref, policy)
    if ref:
        torch._foreach_lerp_(list(ref), list(policy), alpha)


@torch.no_grad()
def hard_update_(ref: Sequence[torch.Tensor], policy: Sequence[torch.Tensor]) -> None:
    """``ref <- policy`` in place."""
    _check_pairs(ref, policy)
    if ref:
        torch._foreach_copy_(list(ref), list(policy))


@dataclass
class ReferenceUpdater:
    """Applies the update rule at the right optimizer steps and remembers what it did.

    Its state (``n_updates``, ``update_steps``) is part of the training checkpoint, so a resumed run
    continues the same schedule.
    """

    mode: RefUpdateMode
    alpha: float | None = None
    tau: int | None = None
    n_updates: int = 0
    update_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mode = RefUpdateMode(self.mode)
        if self.mode is RefUpdateMode.NONE:
            if self.alpha is not None or self.tau is not None:
                raise ValueError("ref_update 'none' takes neither alpha nor tau")
            return
        if self.tau is None or self.tau < 1:
            raise ValueError(f"ref_update {self.mode.value!r} needs tau >= 1, got {self.tau}")
        if self.mode is RefUpdateMode.SOFT:
            if self.alpha is None or not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"ref_update 'soft' needs alpha in [0, 1], got {self.alpha}")
        elif self.alpha is not None:
            raise ValueError("ref_update 'hard' copies the policy; alpha must not be set")

    def is_due(self, step: int) -> bool:
        """True when the reference must be updated after optimizer step ``step`` (1-based)."""
        return self.mode is not RefUpdateMode.NONE and step >= 1 and step % self.tau == 0

    def maybe_update(self, step: int, ref: Sequence[torch.Tensor] = (), policy: Sequence[torch.Tensor] = (),
                     apply: Callable[[], None] | None = None) -> bool:
        """Update ``ref`` in place if ``step`` is due (or call ``apply``, which does the update its own
        way: LoRA adapters); return whether it was."""
        if not self.is_due(step):
            return False
        if apply is not None:
            apply()
        elif self.mode is RefUpdateMode.SOFT:
            soft_update_(ref, policy, self.alpha)
        else:
            hard_update_(ref, policy)
        self.n_updates += 1
        self.update_steps.append(step)
        return True

    def state_dict(self) -> dict:
        return {"n_updates": self.n_updates, "update_steps": list(self.update_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.n_updates = int(state["n_updates"])
        self.update_steps = [int(s) for s in state["update_steps"]]
