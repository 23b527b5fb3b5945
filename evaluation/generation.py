"""Sampling from a policy: batched ``generate`` with the KV cache, deterministic for a seed.

Prompts are left-padded so every row's continuation starts at the same position. Each batch is
seeded from (seed, batch index), so results do not depend on how batches are spread over actors.
Per-token predictive entropies are returned for the diversity metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evaluation.config import SamplingConfig


@dataclass
class Sample:
    prompt_id: str
    sample_index: int
    prompt: str
    response: str
    num_tokens: int
    mean_entropy: float | None  # None for an empty response: no token, no entropy (not 0)


def load_policy(path: str, dtype: torch.dtype = torch.float32):
    """A model directory, Hub name, or storage URI (an exported policy in ``s3://...``, copied to
    this machine's model cache first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from trainers.compat import dtype_argument
    from trainers.state.storage import local_model_dir

    # Every load in every generation actor (and the KL pool) comes through here: one bar per load
    # per actor is noise in the driver's console.
    hf_logging.disable_progress_bar()
    path = local_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **dtype_argument(dtype))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompts: list[tuple[str, str]], cfg: SamplingConfig, batch_offset: int = 0,
             batch_size: int | None = None) -> list[Sample]:
    """``prompts`` are ``(prompt_id, text)``; returns ``num_samples`` samples per prompt, in order."""
    device = next(model.parameters()).device
    batch_size = batch_size or cfg.batch_size
    tokenizer.padding_side = "left"
    samples: list[Sample] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start : start + batch_size]
        encoded = tokenizer([text for _, text in chunk], return_tensors="pt", padding=True, add_special_tokens=True).to(device)
        torch.manual_seed(cfg.seed * 100_003 + batch_offset + b)
        greedy = cfg.temperature == 0.0
        out = model.generate(
            **encoded, do_sample=not greedy, temperature=None if greedy else cfg.temperature, top_p=None if greedy else cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.num_samples, use_cache=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            output_scores=True, return_dict_in_generate=True,
        )
        new_tokens = out.sequences[:, encoded["input_ids"].shape[1]:]
        # Entropy of each step's sampling distribution, over the tokens actually produced.
        logprobs = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], dim=1)
        entropy = -(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum(-1)
        produced = new_tokens != tokenizer.pad_token_id if tokenizer.pad_token_id != tokenizer.eos_token_id else torch.ones_like(new_tokens, dtype=torch.bool)
        if tokenizer.eos_token_id is not None:  # count up to and including the first EOS
            is_eos = (new_tokens == tokenizer.eos_token_id).int()
            produced = (is_eos.cumsum(-1) - is_eos) == 0
        for row in range(new_tokens.shape[0]):
            prompt_id, text = chunk[row // cfg.num_samples]
            n = int(produced[row].sum())
            response = tokenizer.decode(new_tokens[row, :n], skip_special_tokens=True)
            samples.append(Sample(prompt_id, row % cfg.num_samples, text, response, n,
                                  float(entropy[row, :n].mean()) if n else None))
    return samples
