"""Validation that every rank runs in lock step, with exact metrics.

Under FSDP every forward is a collective (each block all-gathers its parameters), so every rank
must run the same number of forwards or the collectives stop lining up and the run hangs.
``trainers.data.batching.validation_micro_batches`` gives every rank as many micro-batches (a rank
that runs out gets a copy of a pair at weight 0). Sums are weighted, reduced over ranks once, then
divided: the metrics equal a one-worker pass over the same pairs. With no validation pairs there
are no validation metrics at all (absent, never 0.0).

Preference metrics are measured against the *initial* model (the frozen starting point, not the
moving reference), so they stay comparable across alpha and tau:

    val/loss, val/rewards/accuracy, val/rewards/margins   DPO/IPO against the initial model
    val/logps/chosen                                      the policy's mean log-prob of chosen
    val/kl_to_initial                                     per-token KL(policy || initial) on chosen
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.data.batching import collate, validation_micro_batches
from trainers.config import TrainingConfig
from trainers.data.types import TokenizedPair
from trainers.model.sharding import DeviceTotals
from trainers.model.scoring import Scorer, logps_and_kl
from trainers.trdpo import PreferenceLogps, preference_loss


@dataclass
class Totals(DeviceTotals):
    """Weighted sums of validation quantities; one all-reduce, then ratios."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor
    chosen_logp: torch.Tensor
    kl: torch.Tensor
    kl_tokens: torch.Tensor
    pairs: torch.Tensor


@torch.no_grad()
def preference_validation(pairs: list[TokenizedPair], policy: Scorer, initial: Scorer, cfg: TrainingConfig, max_length: int,
                          pad_id: int, device, rank: int, world: int) -> dict[str, float]:
    batches = validation_micro_batches(pairs, cfg, max_length, rank, world)
    if not batches:
        return {}
    totals = Totals.zeros(device)
    for micro in batches:
        batch = collate(micro, pad_id, cfg, max_length, cost=policy.layout_cost).to(device)
        n, weight = batch.num_pairs, micro.weights.to(device)
        scores, initial_scores, kl, kl_tokens = logps_and_kl(policy, initial, batch, cfg.average_log_prob)
        out = preference_loss(cfg.loss, PreferenceLogps(scores[:n], scores[n:], initial_scores[:n], initial_scores[n:]),
                              cfg.beta, cfg.label_smoothing)
        totals.add(loss=out.losses * weight, accuracy=out.accuracy * weight, margin=out.margins * weight,
                   chosen_logp=scores[:n] * weight, kl=kl[:n] * weight, kl_tokens=kl_tokens[:n] * weight, pairs=weight)
    t = totals.reduced()
    count = t["pairs"]
    return {"val/loss": t["loss"] / count, "val/rewards/accuracy": t["accuracy"] / count,
            "val/rewards/margins": t["margin"] / count, "val/logps/chosen": t["chosen_logp"] / count,
            "val/kl_to_initial": t["kl"] / t["kl_tokens"]}


@torch.no_grad()
def sft_validation(pairs: list[TokenizedPair], policy: Scorer, cfg: TrainingConfig, max_length: int, pad_id: int, device,
                   rank: int, world: int) -> dict[str, float]:
    """Per-token mean NLL of the chosen responses, averaged over pairs."""
    batches = validation_micro_batches(pairs, cfg, max_length, rank, world, chosen_only=True)
    if not batches:
        return {}
    totals = Totals.zeros(device)
    for micro in batches:
        batch = collate(micro, pad_id, cfg, max_length, chosen_only=True, cost=policy.layout_cost).to(device)
        scores = policy.sequence_logps(batch, average=True)[0]
        weight = micro.weights.to(device)
        totals.add(loss=-scores * weight, pairs=weight)
    t = totals.reduced()
    return {"val/loss": t["loss"] / t["pairs"]}
