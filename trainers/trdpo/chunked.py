"""Token log-probs and KL straight from hidden states, a chunk of tokens at a time.

A causal LM's last layer maps hidden states ``h`` (``[N, H]``) to logits ``h @ W.T + b``
(``[N, V]``). DPO needs only ``log_softmax(logits)[target]`` per token, but the usual path keeps
the whole ``[N, V]`` logits in fp32, their log-softmax and their gradient: at vocabulary 50k and a
few thousand tokens that is gigabytes, more than the rest of the activations. Here the logits of
``chunk`` tokens exist at a time:

    forward:   for each chunk c:  z_c = h_c @ W.T + b              (fp32 or the autocast dtype)
                                  lse_c = logsumexp(z_c)            (fp32)
                                  out_c = z_c[target] - lse_c
    backward:  recompute z_c, p_c = exp(z_c - lse_c) (the softmax)
               dz_c = g_c * (onehot(target) - p_c)
               dh_c = dz_c @ W,   dW += dz_c.T @ h_c,   db += sum(dz_c)

so the logits follow ``chunk x V``, not ``N x V``; the price is a second ``h_c @ W.T`` per chunk
in the backward (the same trade as activation checkpointing). Only the ``N`` positions that have a
target are passed in: prompt and padding positions never reach the head at all.

Memory beyond the inputs, in the backward (the peak): one ``[V, H]`` gradient accumulator in the
weight's dtype (it is the gradient returned), a few ``[chunk, V]`` temporaries, and, when the
compute dtype differs from the weight's (bf16 autocast over fp32 master weights), one reused
buffer of at most ``chunk x V`` elements in the compute dtype plus the weight's cast to it
(``[V, H]``, as ``F.linear`` under autocast holds from its forward to its backward; none under
FSDP's bf16 parameters, which are already in the compute dtype). ``trainers.model.memory`` charges
exactly these.

Precision mirrors ``F.linear`` under autocast followed by ``.float()`` (the unchunked path): the
matmul runs in the autocast dtype when autocast is on (else in the operands' dtype), the
log-softmax and everything after it in fp32; the weight's gradient is each chunk's product in the
compute dtype, summed over chunks in the weight's dtype (fp32 master weights: in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# Below this many bytes of fp32 ``[tokens, vocab]`` logits the head scores its positions whole: the
# chunked backward recomputes each chunk's logits, a second matmul that only pays when the logits
# would be large. 64 MiB: any micro-batch at a byte-level vocabulary (259: 65k tokens), a few
# hundred tokens at Pythia's 50k.
WHOLE_LOGITS_BYTES = 64 * 2**20


def scores_whole(tokens: int, vocab: int, chunk: int) -> bool:
    """Whether ``tokens`` positions' log-probs are computed from whole logits (plain autograd, no
    recomputation) rather than in chunks: they fit one chunk anyway, or their fp32 logits are small."""
    return tokens <= chunk or tokens * vocab * 4 <= WHOLE_LOGITS_BYTES


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits of ``hidden`` (already in the compute dtype, like ``weight`` and ``bias``) in fp32,
    or in fp64 when computing in fp64 (gradient checks)."""
    return F.linear(hidden, weight, bias).to(torch.promote_types(hidden.dtype, torch.float32))


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None
            out = torch.empty(hidden.shape[0], dtype=torch.promote_types(dtype, torch.float32), device=hidden.device)
            lse = torch.empty_like(out)
            for start in range(0, hidden.shape[0], chunk):
                z = _logits(hidden[start : start + chunk].to(dtype), w, b)
                lse[start : start + chunk] = torch.logsumexp(z, -1)
                picked = z.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
                out[start : start + chunk] = picked - lse[start : start + chunk]
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets, lse)
        ctx.has_bias, ctx.chunk, ctx.dtype = bias is not None, chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, chunk = ctx.dtype, ctx.chunk
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype  # fp32 (fp64 in gradient checks)
        # The weight's gradient accumulates in the weight's own dtype and is returned as it is.
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
        vocab, width = weight.shape
        # A product in the compute dtype that must be summed into another dtype (bf16 products, fp32
        # master weights) goes through one reused buffer of at most chunk x V elements, a block of
        # vocabulary rows at a time: never a whole [V, H] product, nor an fp32 copy of one.
        rows = max(1, min(vocab, chunk * vocab // width))
        buffer = torch.empty(rows, width, dtype=dtype, device=weight.device) if need_w and dtype != weight.dtype else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], chunk):
                stop = min(start + chunk, hidden.shape[0])
                h = hidden[start:stop].to(dtype)
                g = grad_out[start:stop].to(lse.dtype)
                # d(z[t] - logsumexp z)/dz = onehot(t) - softmax(z); built in place in one [chunk, V] buffer.
                dz = _logits(h, w, b).sub_(lse[start:stop, None]).exp_().mul_(-g[:, None])
                dz.scatter_add_(-1, targets[start:stop, None], g[:, None])
                if grad_b is not None:
                    grad_b += dz.sum(0)
                dz = dz.to(dtype)
                if grad_h is not None:
                    grad_h[start:stop] = (dz @ w).to(hidden.dtype)
                if grad_w is None:
                    continue
                if buffer is None:  # the compute dtype is the weight's: one GEMM adds into the gradient in place
                    grad_w.addmm_(dz.t(), h)
                    continue
                for first in range(0, vocab, rows):  # each block's product in the compute dtype (as autocast's backward)
                    last = min(first + rows, vocab)
                    block = torch.mm(dz[:, first:last].t(), h, out=buffer[: last - first])
                    grad_w[first:last] += block
        return (grad_h, grad_w, grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                          chunk: int = 1024) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T + bias)[i, targets[i]]`` for each row ``i`` (``[N]``, fp32),
    with at most ``chunk`` rows of logits alive at once, in the forward and in the backward."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and targets [N]; got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _LinearTokenLogprobs.apply(hidden, weight, bias, targets, chunk, _compute_dtype(hidden, weight))


@torch.no_grad()
def linear_token_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    base_hidden: torch.Tensor, base_weight: torch.Tensor, base_bias: torch.Tensor | None,
                    targets: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For two models' hidden states at the same ``N`` positions: ``(logp, base_logp, kl)``, each
    ``[N]`` fp32: both models' log-probs of the targets and the exact per-position
    ``KL(p || q) = sum_v p(v) (log p(v) - log q(v))`` of their next-token distributions, computed a
    chunk at a time (no gradient: validation)."""
    dtype = _compute_dtype(hidden, weight)
    n = hidden.shape[0]
    logp, base_logp, kl = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
    with torch.autocast(hidden.device.type, enabled=False):
        w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None
        bw, bb = base_weight.to(dtype), base_bias.to(dtype) if base_bias is not None else None
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            p = torch.log_softmax(_logits(hidden[rows].to(dtype), w, b), -1)
            q = torch.log_softmax(_logits(base_hidden[rows].to(dtype), bw, bb), -1)
            t = targets[rows, None]
            logp[rows], base_logp[rows] = p.gather(-1, t).squeeze(-1), q.gather(-1, t).squeeze(-1)
            kl[rows] = (p.exp() * (p - q)).sum(-1)
    return logp, base_logp, kl


def sum_by_sequence(values: torch.Tensor, sequence: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """``out[s] = sum of values[i] with sequence[i] == s`` (``[num_sequences]``, differentiable)."""
    return torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(0, sequence, values)
