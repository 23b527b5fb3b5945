"""Per-sequence log-probabilities of response tokens.

Labels are aligned with the input ids (``labels[t] == input_ids[t]`` on response tokens) and hold
``IGNORE_INDEX`` on prompt and padding positions. The logits at position ``t`` predict token
``t + 1``, so both are shifted by one before gathering.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(logps, n_tokens)``: the summed (or, with ``average``, per-token mean) log-prob of
    the unmasked label tokens of each sequence, and how many tokens were counted.

    ``logits`` is ``[batch, time, vocab]``; ``labels`` is ``[batch, time]``. The computation is in
    float32 whatever the logits' dtype: bf16 log-probs summed over hundreds of tokens lose the
    differences DPO depends on.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on batch/time")
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe_labels = labels.masked_fill(~mask, 0)
    # log_softmax(x)[y] = x[y] - logsumexp(x): avoids materialising a second [B, T, V] tensor.
    token_logps = torch.gather(logits, -1, safe_labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    token_logps = token_logps * mask
    n_tokens = mask.sum(-1)
    logps = token_logps.sum(-1)
    if average:
        logps = logps / n_tokens.clamp(min=1)
    return logps, n_tokens


def token_kl(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(kl_sum, n_tokens)`` per sequence: the sum over response positions of the exact
    KL(p || q) between the next-token distributions p = softmax(logits), q = softmax(base_logits),

        KL_t = sum_v p_t(v) * (log p_t(v) - log q_t(v)),

    at the positions that predict a label token (the same positions ``sequence_logprobs`` scores).
    """
    logp = torch.log_softmax(logits[:, :-1, :].float(), -1)
    logq = torch.log_softmax(base_logits[:, :-1, :].float(), -1)
    mask = labels[:, 1:] != IGNORE_INDEX
    kl = (logp.exp() * (logp - logq)).sum(-1) * mask
    return kl.sum(-1), mask.sum(-1)
