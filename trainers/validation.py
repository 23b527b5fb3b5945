"""Validation that every rank runs in lock step, with exact metrics.

Under FSDP every forward is a collective (each block all-gathers its parameters), so every rank
must run the same number of forwards or the collectives stop lining up and the run hangs. Rank r
takes the pairs ``r, r + world, ...``; every rank runs ``ceil(ceil(n / world) / batch)`` chunks, and
a chunk with no real pair left on this rank is a copy of pair 0 at weight 0. Sums are weighted,
reduced over ranks once, then divided: the metrics equal a one-worker pass over the same pairs.

Preference metrics are measured against the *initial* model (the frozen starting point, not the
moving reference), so they stay comparable across alpha and tau:

    val/loss, val/rewards/accuracy, val/rewards/margins   DPO/IPO against the initial model
    val/logps/chosen                                      the policy's mean log-prob of chosen
    val/kl_to_initial                                     per-token KL(policy || initial) on chosen
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.config import TrainingConfig
from trainers.data import PreferenceBatch, TokenizedPair, collate_pairs
from trainers.distributed import DeviceTotals
from trainers.trdpo import PreferenceLogps, preference_loss, sequence_logprobs, token_kl


def forward_logits(model, batch: PreferenceBatch, bf16: bool) -> torch.Tensor:
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


@dataclass
class Chunk:
    pairs: list[TokenizedPair]
    weights: torch.Tensor  # 1.0 for a real pair, 0.0 for padding


def lockstep_chunks(pairs: list[TokenizedPair], rank: int, world: int, batch_size: int) -> list[Chunk]:
    """This rank's validation chunks; every rank gets the same number of them."""
    if not pairs:
        return []
    mine = pairs[rank::world]
    per_rank = -(-len(pairs) // world)
    chunks = []
    for start in range(0, per_rank, batch_size):
        real = mine[start : start + batch_size]
        if real:
            chunks.append(Chunk(real, torch.ones(len(real))))
        else:  # this rank ran out: a zero-weight stand-in keeps the collective forward in step
            chunks.append(Chunk([pairs[0]], torch.zeros(1)))
    return chunks


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
def preference_validation(pairs: list[TokenizedPair], policy, initial, cfg: TrainingConfig, pad_id: int, device, bf16: bool,
                          rank: int, world: int) -> dict[str, float]:
    totals = Totals.zeros(device)
    for chunk in lockstep_chunks(pairs, rank, world, cfg.per_device_batch_size):
        batch = collate_pairs(chunk.pairs, pad_id).to(device)
        n, weight = batch.num_pairs, chunk.weights.to(device)
        logits = forward_logits(policy, batch, bf16)
        initial_logits = forward_logits(initial, batch, bf16)
        scores = sequence_logprobs(logits, batch.labels, average=cfg.average_log_prob)[0]
        initial_scores = sequence_logprobs(initial_logits, batch.labels, average=cfg.average_log_prob)[0]
        out = preference_loss(cfg.loss, PreferenceLogps(scores[:n], scores[n:], initial_scores[:n], initial_scores[n:]),
                              cfg.beta, cfg.label_smoothing)
        kl, kl_tokens = token_kl(logits[:n], initial_logits[:n], batch.labels[:n])
        totals.add(loss=out.losses * weight, accuracy=out.accuracy * weight, margin=out.margins * weight,
                   chosen_logp=scores[:n] * weight, kl=kl * weight, kl_tokens=kl_tokens * weight, pairs=weight)
    t = totals.reduced()
    count = max(t["pairs"], 1.0)
    return {"val/loss": t["loss"] / count, "val/rewards/accuracy": t["accuracy"] / count,
            "val/rewards/margins": t["margin"] / count, "val/logps/chosen": t["chosen_logp"] / count,
            "val/kl_to_initial": t["kl"] / max(t["kl_tokens"], 1.0)}


@torch.no_grad()
def sft_validation(pairs: list[TokenizedPair], policy, cfg: TrainingConfig, pad_id: int, device, bf16: bool,
                   rank: int, world: int) -> dict[str, float]:
    """Per-token mean NLL of the chosen responses, averaged over pairs."""
    totals = Totals.zeros(device)
    for chunk in lockstep_chunks(pairs, rank, world, cfg.per_device_batch_size):
        batch = collate_pairs(chunk.pairs, pad_id, chosen_only=True).to(device)
        scores = sequence_logprobs(forward_logits(policy, batch, bf16), batch.labels, average=True)[0]
        weight = chunk.weights.to(device)
        totals.add(loss=-scores * weight, pairs=weight)
    t = totals.reduced()
    return {"val/loss": t["loss"] / max(t["pairs"], 1.0)}
