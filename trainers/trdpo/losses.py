"""Preference losses: DPO (sigmoid, optional label smoothing) and IPO.

With policy log-probs ``pc, pr`` and reference log-probs ``rc, rr`` for the chosen and rejected
responses, the log-ratio difference is ``h = (pc - rc) - (pr - rr)`` and

    DPO (Rafailov et al. 2023):   loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    IPO (Azar et al. 2023):       loss = (h - 1 / (2 * beta)) ** 2

``eps`` is the label-smoothing rate (cDPO). The implicit rewards are ``beta * (pc - rc)`` and
``beta * (pr - rr)``; IPO is usually fed per-token mean log-probs (``average=True`` upstream).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreferenceLogps:
    """Log-probs of a batch of pairs, each tensor of shape ``[batch]``."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor


@dataclass(frozen=True)
class PreferenceLoss:
    """Per-pair losses and implicit rewards (all ``[batch]``); rewards carry no gradient."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """1.0 where the chosen response has the larger implicit reward, else 0.0."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def _log_ratio_difference(logps: PreferenceLogps) -> torch.Tensor:
    return (logps.policy_chosen - logps.reference_chosen) - (logps.policy_rejected - logps.reference_rejected)


def _rewards(logps: PreferenceLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = beta * (logps.policy_chosen - logps.reference_chosen).detach()
    rejected = beta * (logps.policy_rejected - logps.reference_rejected).detach()
    return chosen, rejected


def dpo_loss(logps: PreferenceLogps, beta: float, label_smoothing: float = 0.0) -> PreferenceLoss:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h = _log_ratio_difference(logps)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return PreferenceLoss(losses, *_rewards(logps, beta))


def ipo_loss(logps: PreferenceLogps, beta: float) -> PreferenceLoss:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = _log_ratio_difference(logps)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(losses, *_rewards(logps, beta))


def preference_loss(kind: str, logps: PreferenceLogps, beta: float, label_smoothing: float = 0.0) -> PreferenceLoss:
    """Dispatch by the config's ``training.loss`` name (``sigmoid`` or ``ipo``)."""
    if kind == "sigmoid":
        return dpo_loss(logps, beta, label_smoothing)
    if kind == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid (DPO) loss only")
        return ipo_loss(logps, beta)
    raise ValueError(f"unknown preference loss {kind!r}; expected 'sigmoid' or 'ipo'")
