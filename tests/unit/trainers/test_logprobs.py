import math

import pytest
import torch

from trainers.trdpo import IGNORE_INDEX, sequence_logprobs

pytestmark = pytest.mark.exactness


def test_masked_sum_and_mean_match_hand_computation():
    """Vocab 2, one sequence of 3 tokens [p, a, b] with the prompt token p masked.

    Logits at t=0 are [0, 0]   -> log p(a=1) = log(1/2)            = -0.693147
    Logits at t=1 are [ln 3, 0] -> log p(b=0) = log(3/4)           = -0.287682
    Logits at t=2 predict nothing (no next token).
    Sum = -0.980829; mean over the 2 response tokens = -0.490415.
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    total, n = sequence_logprobs(logits, labels)
    mean, _ = sequence_logprobs(logits, labels, average=True)
    assert n.tolist() == [2]
    assert torch.allclose(total, torch.tensor([math.log(0.5) + math.log(0.75)]), atol=1e-6)
    assert torch.allclose(mean, total / 2, atol=1e-6)


def test_padding_and_prompt_do_not_contribute():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4]])
    changed = logits.clone()
    changed[0, 0] += 100.0  # the logits at t=0 predict a masked prompt token: no effect on row 0
    changed[0, 4] -= 50.0   # the last position predicts nothing
    a, _ = sequence_logprobs(logits, labels)
    b, _ = sequence_logprobs(changed, labels)
    assert torch.allclose(a, b)
    expected = torch.log_softmax(logits[0, 1], -1)[3] + torch.log_softmax(logits[0, 2], -1)[4]
    assert torch.allclose(a[0], expected)


def test_bf16_logits_are_scored_in_float32():
    logits = torch.randn(1, 4, 11).to(torch.bfloat16)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])
    out, _ = sequence_logprobs(logits, labels)
    assert out.dtype == torch.float32
    reference, _ = sequence_logprobs(logits.float(), labels)
    assert torch.allclose(out, reference)


def test_empty_response_gives_zero_and_mean_does_not_divide_by_zero():
    logits = torch.randn(1, 3, 5)
    labels = torch.full((1, 3), IGNORE_INDEX)
    total, n = sequence_logprobs(logits, labels)
    mean, _ = sequence_logprobs(logits, labels, average=True)
    assert n.item() == 0 and total.item() == 0.0 and mean.item() == 0.0


def test_token_kl_by_hand():
    """Vocab 2, positions t=0,1 predict labels; only t=1 is a response position.

    At t=1: p = softmax([ln 3, 0]) = (3/4, 1/4), q = softmax([0, 0]) = (1/2, 1/2)
    KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812.
    t=0 is a prompt position: whatever p and q are there, it does not count.
    """
    from trainers.trdpo import token_kl

    p_logits = torch.tensor([[[9.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    q_logits = torch.tensor([[[0.0, 9.0], [0.0, 0.0], [1.0, 0.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1]])
    kl, n = token_kl(p_logits, q_logits, labels)
    assert n.tolist() == [1]
    assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    same, _ = token_kl(p_logits, p_logits, labels)
    assert same.item() == pytest.approx(0.0, abs=1e-7)
