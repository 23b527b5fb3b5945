"""The TR-DPO reference update for low-rank adapters, in weight space.

With LoRA one frozen base ``W`` serves every role, and each adapted layer's delta is a product of
factors, ``ΔW = s·B·A`` (``B`` is ``[out, r]``, ``A`` is ``[r, in]``, ``s`` PEFT's scaling). The
paper's soft update mixes *weights*:

    ΔW_ref <- α·ΔW_policy + (1 − α)·ΔW_ref

Mixing the factors instead, ``(α·B_π + (1 − α)·B_ref)(α·A_π + (1 − α)·A_ref)``, is a different rule
(its cross terms ``α(1 − α)(B_π·A_ref + B_ref·A_π)`` belong to neither model). The weighted sum of
two low-rank products is itself a low-rank product of the stacked factors:

    α·B_π·A_π + (1 − α)·B_ref·A_ref = [α·B_π | (1 − α)·B_ref] · [A_π ; A_ref]

so after ``k`` updates the reference delta is ``Σ_j α(1 − α)^(k−j)·ΔW_π(jτ)`` exactly, with rank up
to ``k·r``. The reference adapter has a fixed rank ``R`` (fixed shapes keep FSDP2 sharding,
checkpoints and optimizer-free state simple), so each update recompresses the stacked factors to
at most ``R`` columns through two thin QRs and the SVD of a small core:

    B = Q_B·R_B,  Aᵀ = Q_A·R_A,  R_B·R_Aᵀ = U·S·Vᵀ   =>   B·A = (Q_B·U)·S·(Q_A·V)ᵀ

That is the exact SVD of ``B·A`` at the cost of ``O((out + in)·(r + R)²)``, never the dense
``[out, in]`` product. Singular values are then dropped from the smallest while the dropped
Frobenius mass stays within ``rtol`` of the delta's norm, and in any case beyond ``R``
(Eckart–Young: the best rank-``R`` approximation). Terms whose weight ``α(1 − α)^(k−j)`` has decayed
are dropped that way too, as soon as they no longer matter at ``rtol``.

What is dropped is accounted for: after update ``k`` the distance to the exact weight-space
reference is at most ``e_k = (1 − α)·e_{k−1} + d_k`` (``d_k`` the Frobenius norm cut at update
``k``; the older error is carried by the ``(1 − α)`` weight of the old reference).
:class:`LowRankErrorBound` keeps that bound per layer and reports the largest relative one,
``e_k / ‖ΔW_ref‖_F``: the ``ref/lora_error`` a run logs. When the exact rank fits ``R`` only
rounding-level singular values go (``rtol``), and the reference is the paper's rule to within
``rtol/α`` relative. Small ``α`` remembers more updates (``(1 − α)^m`` decays slowly), so it needs
a larger ``R`` for the same error.

The functions take full (unsharded) factors without the PEFT scaling: the reference adapter is
built with the policy's scaling, so ``s`` cancels. Pure torch; the caller gathers shards under
FSDP2 and writes its own slice back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class LowRankUpdate:
    """What one layer's update kept and cut (Frobenius norms, of the unscaled ``B·A``)."""

    norm: float  # of the new reference delta, as stored
    discarded: float  # of what was cut to fit the rank and the tolerance
    rank: int  # columns of the reference factors now in use (the rest are zero)


def _check_factors(ref_B: torch.Tensor, ref_A: torch.Tensor, policy_B: torch.Tensor, policy_A: torch.Tensor) -> None:
    if ref_B.dim() != 2 or ref_A.dim() != 2 or policy_B.dim() != 2 or policy_A.dim() != 2:
        raise ValueError("low-rank factors must be matrices: B [out, rank], A [rank, in]")
    if ref_B.shape[1] != ref_A.shape[0] or policy_B.shape[1] != policy_A.shape[0]:
        raise ValueError(f"inner ranks differ: reference {tuple(ref_B.shape)} x {tuple(ref_A.shape)}, "
                         f"policy {tuple(policy_B.shape)} x {tuple(policy_A.shape)}")
    if ref_B.shape[0] != policy_B.shape[0] or ref_A.shape[1] != policy_A.shape[1]:
        raise ValueError(f"the reference delta is {ref_B.shape[0]} x {ref_A.shape[1]} but the policy's is "
                         f"{policy_B.shape[0]} x {policy_A.shape[1]}")


def _kept_rank(singular_values: torch.Tensor, max_rank: int, rtol: float) -> int:
    """The fewest leading singular values whose dropped tail is within ``rtol`` of the total
    Frobenius norm, and at most ``max_rank``."""
    energy = singular_values.square()
    total = float(energy.sum())
    if total == 0.0:
        return 0
    # tail[i] = energy of singular values i, i+1, ...: keeping i values drops tail[i]
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
    allowed = (rtol * math.sqrt(total)) ** 2
    fits = torch.nonzero(tail <= allowed)
    needed = int(fits[0]) if len(fits) else len(singular_values)
    return min(needed, max_rank)


def lowrank_sum(factors: Sequence[tuple[float, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ w_i·B_i·A_i`` as one stacked pair ``(B, A)``: the weights folded into the ``B`` blocks."""
    return (torch.cat([w * B for w, B, _ in factors], dim=1), torch.cat([A for _, _, A in factors], dim=0))


def lowrank_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """``‖B·A‖_F`` without the dense product: ``trace((BᵀB)(AAᵀ))`` is ``‖B·A‖_F²``."""
    B64, A64 = B.double(), A.double()
    return math.sqrt(max(float(torch.trace((B64.T @ B64) @ (A64 @ A64.T))), 0.0))


def recompress(B: torch.Tensor, A: torch.Tensor, max_rank: int, rtol: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(B', A', norm, discarded)``: ``B'·A'`` the truncated SVD of ``B·A`` with at most
    ``max_rank`` columns (the rest cut only as far as ``rtol`` allows), in float64; ``norm`` is the
    Frobenius norm of ``B'·A'``, ``discarded`` that of ``B·A − B'·A'``. The singular values are
    split evenly between the two factors (``√S`` each), which keeps them equally scaled."""
    B64, A64 = B.double(), A.double()
    q_b, r_b = torch.linalg.qr(B64)  # B = Q_B R_B
    q_a, r_a = torch.linalg.qr(A64.T)  # Aᵀ = Q_A R_A, so B A = Q_B (R_B R_Aᵀ) Q_Aᵀ
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = _kept_rank(s, max_rank, rtol)
    root = s[:keep].sqrt()
    new_B = (q_b @ u[:, :keep]) * root
    new_A = root[:, None] * (vh[:keep] @ q_a.T)
    return new_B, new_A, float(s[:keep].norm()), float(s[keep:].norm())


@torch.no_grad()
def lowrank_soft_update_(ref_B: torch.Tensor, ref_A: torch.Tensor, policy_B: torch.Tensor, policy_A: torch.Tensor,
                         alpha: float, rtol: float = 1e-6) -> LowRankUpdate:
    """In place: ``ref_B·ref_A <- α·policy_B·policy_A + (1 − α)·ref_B·ref_A``.

    ``ref_B`` (``[out, R]``) and ``ref_A`` (``[R, in]``) are the reference adapter's fixed-size
    factors (unused columns are zero); the result is recompressed to at most ``R`` columns,
    exactly when its rank fits (up to singular values within ``rtol`` of its norm), else by
    truncated SVD. Returns what was kept and cut."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_factors(ref_B, ref_A, policy_B, policy_A)
    if alpha == 0.0:  # the reference stays exactly as it is
        return LowRankUpdate(norm=lowrank_norm(ref_B, ref_A), discarded=0.0, rank=int((ref_B.abs().sum(0) > 0).sum()))
    B, A = lowrank_sum([(alpha, policy_B, policy_A), (1.0 - alpha, ref_B, ref_A)])
    new_B, new_A, norm, discarded = recompress(B, A, ref_B.shape[1], rtol)
    keep = new_B.shape[1]
    ref_B.zero_()
    ref_A.zero_()
    ref_B[:, :keep] = new_B.to(ref_B.dtype)
    ref_A[:keep] = new_A.to(ref_A.dtype)
    return LowRankUpdate(norm=norm, discarded=discarded, rank=keep)


@torch.no_grad()
def lowrank_hard_update_(ref_B: torch.Tensor, ref_A: torch.Tensor, policy_B: torch.Tensor, policy_A: torch.Tensor) -> None:
    """In place: ``ref <- policy``; the policy's factors go into the first columns, the rest are
    zeroed. With equal ranks this is a plain copy, so the merged weights are bitwise the policy's."""
    _check_factors(ref_B, ref_A, policy_B, policy_A)
    r = policy_B.shape[1]
    if r > ref_B.shape[1]:
        raise ValueError(f"the reference adapter's rank {ref_B.shape[1]} cannot hold the policy's {r}")
    ref_B.zero_()
    ref_A.zero_()
    ref_B[:, :r] = policy_B
    ref_A[:r] = policy_A


@dataclass
class LowRankErrorBound:
    """How far each layer's stored reference may be from the exact weight-space rule.

    After a soft update ``e <- (1 − α)·e + d`` (``d`` the norm cut by that update), by the triangle
    inequality; a hard update copies the policy exactly and resets it. :meth:`update` returns the
    largest relative bound ``e / ‖ΔW_ref‖_F`` over layers (0 when nothing was ever cut)."""

    alpha: float
    errors: list[float] = field(default_factory=list)  # absolute bound per layer
    norms: list[float] = field(default_factory=list)  # ‖ΔW_ref‖_F per layer after the last update

    def update(self, updates: Sequence[LowRankUpdate]) -> float:
        if self.errors and len(self.errors) != len(updates):
            raise ValueError(f"{len(updates)} layers updated, {len(self.errors)} tracked")
        previous = self.errors or [0.0] * len(updates)
        self.errors = [(1.0 - self.alpha) * e + u.discarded for e, u in zip(previous, updates)]
        self.norms = [u.norm for u in updates]
        return self.relative()

    def reset(self) -> None:
        self.errors = [0.0] * len(self.errors)

    def relative(self) -> float:
        worst = 0.0
        for error, norm in zip(self.errors, self.norms):
            if error > 0.0:
                worst = max(worst, error / norm if norm > 0.0 else math.inf)
        return worst

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "errors": list(self.errors), "norms": list(self.norms)}

    def load_state_dict(self, state: dict) -> None:
        if float(state["alpha"]) != self.alpha:
            raise ValueError(f"the saved bound was kept for alpha {state['alpha']}, this run's is {self.alpha}")
        self.errors = [float(e) for e in state["errors"]]
        self.norms = [float(n) for n in state["norms"]]
