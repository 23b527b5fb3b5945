"""Sampled KL from the starting model, checked against the exact KL of a tiny enumerable model."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from evaluation.kl import (
    exact_sequence_kl,
    position_ids_from_mask,
    response_mask_until_eos,
    sample_responses,
    sampled_kl,
    score_sequences,
)

VOCAB = 6


def tiny_llama(seed: int):
    """A 1-layer Llama over 6 tokens. initializer_range 0.5 makes the next-token distributions
    peaked (about 0.5 nats of KL per token between two seeds), so the KL is far from 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.5, pad_token_id=0,
                      bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0), tiny_llama(1)


def test_position_ids_and_eos_mask_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    tokens = torch.tensor([[3, 2, 4], [4, 4, 4], [2, 5, 2]])
    assert response_mask_until_eos(tokens, 2).int().tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert response_mask_until_eos(tokens, None).all()


def test_scores_do_not_depend_on_padding_side_and_match_a_plain_sum(models):
    policy, _ = models
    rows = [([1, 2], [3, 4, 5]), ([4], [1]), ([5, 3, 2, 1], [2, 2])]  # (prompt, response)
    width = max(len(p) + len(r) for p, r in rows)

    def batch(left: bool):
        ids, attn, resp = [], [], []
        for p, r in rows:
            pad = width - len(p) - len(r)
            seq, a, m = p + r, [1] * (len(p) + len(r)), [0] * len(p) + [1] * len(r)
            ids.append([0] * pad + seq if left else seq + [0] * pad)
            attn.append([0] * pad + a if left else a + [0] * pad)
            resp.append([0] * pad + m if left else m + [0] * pad)
        return torch.tensor(ids), torch.tensor(attn), torch.tensor(resp)

    left, right = score_sequences(policy, *batch(True)), score_sequences(policy, *batch(False), batch_size=2)
    alone = []
    for p, r in rows:  # unpadded, one row at a time, summed by hand
        logp = torch.log_softmax(policy(torch.tensor([p + r])).logits[0].float(), -1)
        alone.append(sum(float(logp[len(p) + i - 1, tok].detach()) for i, tok in enumerate(r)))
    torch.testing.assert_close(left, torch.tensor(alone), atol=1e-5, rtol=0)
    torch.testing.assert_close(right, torch.tensor(alone), atol=1e-5, rtol=0)


def test_sampled_kl_matches_the_exact_kl(models):
    """Responses of exactly 3 tokens (no EOS): 6^3 = 216 possible responses per prompt, so the
    exact KL is a finite sum. 3000 policy samples per prompt must land within 4 Monte Carlo SEs."""
    policy, ref = models
    prompts = [[1, 2, 3], [4]]  # different lengths: the sampler left-pads the second
    exact = [exact_sequence_kl(policy, ref, p, 3) for p in prompts]
    est = sampled_kl(policy, ref, None, prompts, num_samples=3000, max_new_tokens=3, seed=0, batch_size=1000)
    assert est.num_prompts == 2 and est.mean_response_tokens == 3.0 and est.truncated_fraction == 1.0
    assert abs(est.mean - sum(exact) / 2) < 4 * est.standard_error
    assert est.standard_error < 0.05 * est.mean  # the check has power: the KL is > 20 SE from 0
    for p, kl in zip(prompts, exact):
        one = sampled_kl(policy, ref, None, [p], num_samples=3000, max_new_tokens=3, seed=1, batch_size=1000)
        assert abs(one.mean - kl) < 4 * one.standard_error, (p, one, kl)
        # The reverse direction is a different number (3.10 vs 5.05 and 9.82 vs 8.18 nats here):
        # sampling from the wrong model, or scoring the models swapped, would be caught.
        reverse = exact_sequence_kl(ref, policy, p, 3)
        assert abs(one.mean - reverse) > 10 * one.standard_error


def test_sampled_kl_with_eos_matches_the_exact_kl_over_variable_lengths(models):
    """With EOS = token 2 and at most 3 new tokens, the responses are: any tokens ending at the
    first EOS (lengths 1-3), or 3 tokens without EOS (cut). Their probabilities sum to 1; the exact
    KL over them is computed here plainly (right-padded rows of different lengths)."""
    policy, ref = models
    eos, prompt = 2, [1, 3]
    responses = [list(r[:k]) + [eos] for k in range(3) for r in itertools.product([t for t in range(VOCAB) if t != eos], repeat=k)]
    responses += [list(r) for r in itertools.product([t for t in range(VOCAB) if t != eos], repeat=3)]
    width = len(prompt) + 3
    ids = torch.tensor([prompt + r + [0] * (3 - len(r)) for r in responses])
    attn = torch.tensor([[1] * (len(prompt) + len(r)) + [0] * (3 - len(r)) for r in responses])
    resp = torch.tensor([[0] * len(prompt) + [1] * len(r) + [0] * (3 - len(r)) for r in responses])
    assert ids.shape[1] == width
    logp, logq = score_sequences(policy, ids, attn, resp).double(), score_sequences(ref, ids, attn, resp).double()
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    exact = float((logp.exp() * (logp - logq)).sum())

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=eos)
    est = sampled_kl(policy, ref, tokenizer, [prompt], num_samples=4000, max_new_tokens=3, seed=2, batch_size=1000)
    assert abs(est.mean - exact) < 4 * est.standard_error, (est, exact)
    # Some responses stopped early, some were cut: both kinds were exercised.
    p_cut = float(logp[-5 ** 3:].exp().sum())
    assert est.truncated_fraction == pytest.approx(p_cut, abs=4 * math.sqrt(p_cut * (1 - p_cut) / 4000))
    assert 0.05 < p_cut < 0.95


def test_samples_stop_at_eos_and_are_seeded(models):
    policy, _ = models
    a = sample_responses(policy, [[1, 3], [5]], num_samples=50, max_new_tokens=4, seed=7, eos_token_id=2, batch_size=32)
    b = sample_responses(policy, [[1, 3], [5]], num_samples=50, max_new_tokens=4, seed=7, eos_token_id=2, batch_size=32)
    assert torch.equal(a.input_ids, b.input_ids)
    new, keep = a.input_ids[:, 2:], a.response_mask[:, 2:].bool()
    assert a.prompt_index.tolist() == [0] * 50 + [1] * 50
    for row, mask, cut in zip(new, keep, a.truncated):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # one contiguous response
        assert (row[n:] == 0).all()  # padding after the response
        assert bool(cut) == (2 not in row[:n].tolist())
        assert cut or row[n - 1] == 2  # a response that was not cut ends with its EOS
    assert 0 < int(a.truncated.sum()) < 100


def test_sampled_kl_leaves_the_models_in_their_modes(models):
    policy, ref = models
    policy.train()
    try:
        sampled_kl(policy, ref, None, [[1]], num_samples=2, max_new_tokens=1)
        assert policy.training and not ref.training
    finally:
        policy.eval()
