"""Sampled KL of a policy from its starting model (torch only; any Hugging Face causal LM).

The quantity is the sequence-level KL on the policy's own responses,

    KL(pi || pi0 | x) = E_{y ~ pi(.|x)} [ log pi(y|x) - log pi0(y|x) ],
    KL(pi || pi0)     = mean over prompts x of KL(pi || pi0 | x),

estimated with k samples per prompt as the mean of the log-ratios
log pi(y_i|x) - log pi0(y_i|x), where log p(y|x) is the sum of the response tokens' log-probs
(prompt and padding masked out). Per prompt the estimate is unbiased; a single log-ratio can be
negative, the expectation cannot.

Details that decide whether the number means anything:

* Samples come from the policy at temperature 1 with no top-k/top-p: any other sampling rule
  draws from a different distribution, and the mean log-ratio is then not a KL of anything.
  :func:`sample_responses` is a plain ancestral sampler with a KV cache, seeded by its own
  ``torch.Generator``, so it depends on no generation config a checkpoint ships.
* A response ends at its first EOS (kept, it is a token the policy chose). One cut at
  ``max_new_tokens`` is scored as that prefix, so the estimate is the KL between the distributions
  of the first ``max_new_tokens`` tokens: by the chain rule, a lower bound of the full-response
  KL. ``truncated_fraction`` says how often this happened.
* Padding does not move positions: position ids are counted from the attention mask
  (``cumsum - 1``), so a left- or right-padded row scores exactly as the same row unpadded.

Errors. ``standard_error`` is the Monte Carlo error given these prompts,
sqrt(sum_x s_x^2 / k) / n, with s_x the standard deviation of prompt x's log-ratios;
``prompt_standard_error`` is sd(per-prompt means) / sqrt(n), which also covers the choice of prompts.

:func:`exact_sequence_kl` enumerates every response of a fixed length for a tiny vocabulary; the
tests use it to check the sampled estimate.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, … over the attended tokens of each row, whatever side the padding is on."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def _eval_mode(*models) -> Iterator[None]:
    """Dropout would make both the samples and the scores noisy; restore the caller's modes after."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@torch.no_grad()
def score_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                    batch_size: int = 32) -> torch.Tensor:
    """Per-row sum of ``log p(token_t | tokens_<t)`` over the positions where ``response_mask`` is 1.

    ``input_ids``, ``attention_mask`` and ``response_mask`` are ``[N, T]``; padding may be on either
    side (it must be 0 in ``attention_mask`` and in ``response_mask``). Returns ``[N]`` float32 on
    the CPU. The first token of a row cannot be a response token (nothing predicts it)."""
    if not (input_ids.shape == attention_mask.shape == response_mask.shape):
        raise ValueError(f"shapes differ: {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}")
    if response_mask[:, 0].any():
        raise ValueError("response_mask marks the first position of a row; a response needs a prompt token before it")
    device = next(model.parameters()).device
    out = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        mask = attention_mask[start : start + batch_size].to(device)
        resp = response_mask[start : start + batch_size].to(device).bool()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        # Logits at t predict token t+1. log_softmax(x)[y] = x[y] - logsumexp(x), in float32.
        logits = logits[:, :-1].float()
        targets = ids[:, 1:]
        token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        out.append((token_logps * resp[:, 1:]).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class SampledResponses:
    """Prompt + response rows, left-padded prompts, right-padded responses."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    response_mask: torch.Tensor  # [N, T]: response tokens up to and including the first EOS
    prompt_index: torch.Tensor  # [N]: which prompt each row answers
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without an EOS


def response_mask_until_eos(new_tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 on each row's tokens up to and including its first EOS, 0 after; all 1 without an EOS id."""
    if eos_token_id is None:
        return torch.ones_like(new_tokens, dtype=torch.bool)
    is_eos = (new_tokens == eos_token_id).long()
    return (is_eos.cumsum(-1) - is_eos) == 0


def _cache_name(model) -> str:
    # transformers 5 renamed past_key_values to cache (argument and output); 4.x has only the old name.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_responses(model, prompt_ids: Sequence[Sequence[int]], *, num_samples: int, max_new_tokens: int, seed: int = 0,
                     pad_token_id: int = 0, eos_token_id: int | None = None, batch_size: int = 16) -> SampledResponses:
    """``num_samples`` ancestral samples (temperature 1, full vocabulary) per prompt.

    Rows are ``prompt 0 sample 0..k-1, prompt 1 sample 0..k-1, …``. Batch b is drawn with a
    generator seeded from (seed, b): the same inputs, seed and batch size give the same samples."""
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (a BOS will do)")
    device = next(model.parameters()).device
    cache = _cache_name(model)
    rows = [(i, list(p)) for i, p in enumerate(prompt_ids) for _ in range(num_samples)]
    width = max(len(p) for _, p in rows)
    chunks = []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start : start + batch_size]
        # Left padding: every row's next token is predicted at the last position.
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for _, p in chunk], device=device)
        prompt_mask = mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p in chunk], device=device)
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
        new = []
        for t in range(max_new_tokens):
            probs = torch.softmax(out.logits[:, -1].float(), -1)
            token = torch.multinomial(probs, 1, generator=generator)
            new.append(token)
            if t + 1 == max_new_tokens:
                break
            # Tokens after an EOS are still fed (cheaper than shrinking the batch) but never scored.
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            position = position_ids_from_mask(mask)[:, -1:]
            out = model(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True,
                        **{cache: out[cache]})
        new_tokens = torch.cat(new, dim=1)
        keep = response_mask_until_eos(new_tokens, eos_token_id)
        truncated = (new_tokens != eos_token_id).all(-1) if eos_token_id is not None else torch.ones(len(chunk), dtype=torch.bool)
        new_tokens = new_tokens.masked_fill(~keep, pad_token_id)
        chunks.append((
            torch.cat([ids, new_tokens], 1).cpu(),
            torch.cat([prompt_mask, keep.long()], 1).cpu(),
            torch.cat([torch.zeros_like(prompt_mask), keep.long()], 1).cpu(),
            truncated.cpu(),
        ))
    ids, attn, resp, trunc = (torch.cat(parts) for parts in zip(*chunks))
    return SampledResponses(ids, attn, resp, torch.tensor([i for i, _ in rows]), trunc)


@dataclass(frozen=True)
class SampledKL:
    mean: float  # mean over prompts of the per-prompt mean log-ratio (nats per response)
    standard_error: float  # Monte Carlo error given these prompts (module docstring)
    prompt_standard_error: float  # sd of per-prompt means / sqrt(n): also covers the choice of prompts
    per_prompt: tuple[float, ...]
    num_prompts: int
    num_samples: int  # per prompt
    mean_response_tokens: float
    truncated_fraction: float  # responses cut at max_new_tokens (their KL is of the prefix)

    def as_metrics(self, prefix: str = "eval/kl") -> dict[str, float]:
        values = {prefix: self.mean, f"{prefix}_se": self.standard_error, f"{prefix}_prompt_se": self.prompt_standard_error,
                  f"{prefix}_truncated_fraction": self.truncated_fraction}
        return {k: v for k, v in values.items() if not math.isnan(v)}  # a standard error of one prompt is absent


def _encode(tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], add_special_tokens: bool) -> list[list[int]]:
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass token id lists to go without one")
        return [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    return [list(map(int, p)) for p in prompts]


def sampled_kl(policy, ref, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], *, num_samples: int = 8,
               max_new_tokens: int = 64, seed: int = 0, batch_size: int = 16, stop_at_eos: bool = True,
               add_special_tokens: bool = True) -> SampledKL:
    """Estimate KL(policy || ref) from the policy's own samples (module docstring).

    ``prompts`` are strings (encoded with ``tokenizer`` as the evaluation's generation does) or
    token id lists (``tokenizer`` may then be None; pad id 0, no EOS). ``ref`` is the starting
    model (the SFT policy / the initial reference), on any device."""
    prompt_ids = _encode(tokenizer, prompts, add_special_tokens)
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    pad = pad if pad is not None else (eos if eos is not None else 0)
    with _eval_mode(policy, ref):
        samples = sample_responses(policy, prompt_ids, num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed,
                                   pad_token_id=pad, eos_token_id=eos, batch_size=batch_size)
        args = (samples.input_ids, samples.attention_mask, samples.response_mask, batch_size)
        log_ratio = (score_sequences(policy, *args) - score_sequences(ref, *args)).double()
    per_prompt = log_ratio.view(len(prompt_ids), num_samples)
    means = per_prompt.mean(1)
    n = len(prompt_ids)
    if num_samples > 1:
        mc_se = math.sqrt(float((per_prompt.var(1, unbiased=True) / num_samples).sum())) / n
    else:
        mc_se = float("nan")
    prompt_se = float(means.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return SampledKL(
        mean=float(means.mean()), standard_error=mc_se if num_samples > 1 else prompt_se,
        prompt_standard_error=prompt_se, per_prompt=tuple(float(v) for v in means), num_prompts=n,
        num_samples=num_samples, mean_response_tokens=float(samples.response_mask.sum(1).double().mean()),
        truncated_fraction=float(samples.truncated.double().mean()),
    )


@torch.no_grad()
def exact_sequence_kl(policy, ref, prompt_ids: Sequence[int], response_length: int, *, vocab_size: int | None = None,
                      batch_size: int = 4096) -> float:
    """KL(policy || ref) over all ``vocab_size ** response_length`` responses of exactly that length
    (no EOS stop): sum_y p(y|x) (log p(y|x) - log q(y|x)). For tiny test models only.

    Raises if the enumerated probabilities do not sum to 1 (the enumeration missed tokens)."""
    vocab_size = vocab_size or policy.config.vocab_size
    if vocab_size ** response_length > 2_000_000:
        raise ValueError(f"{vocab_size}^{response_length} responses is too many to enumerate")
    responses = torch.tensor(list(itertools.product(range(vocab_size), repeat=response_length)))
    prompt = torch.tensor(list(prompt_ids)).expand(len(responses), -1)
    ids = torch.cat([prompt, responses], 1)
    attn = torch.ones_like(ids)
    resp = torch.cat([torch.zeros_like(prompt), torch.ones_like(responses)], 1)
    with _eval_mode(policy, ref):
        logp = score_sequences(policy, ids, attn, resp, batch_size).double()
        logq = score_sequences(ref, ids, attn, resp, batch_size).double()
    total = float(logp.exp().sum())
    if abs(total - 1.0) > 1e-4:
        raise ValueError(f"enumerated probabilities sum to {total:.6f}, not 1: is vocab_size={vocab_size} the model's?")
    return float((logp.exp() * (logp - logq)).sum())
