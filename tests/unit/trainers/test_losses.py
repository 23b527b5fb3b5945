import math

import pytest
import torch

from trainers.trdpo import PreferenceLogps, dpo_loss, ipo_loss, preference_loss


def logps(pc, pr, rc, rr):
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    return PreferenceLogps(t(pc), t(pr), t(rc), t(rr))


def test_dpo_loss_and_rewards_by_hand():
    """pc=-1, pr=-3, rc=-2, rr=-2, beta=0.5.

    h = (pc - rc) - (pr - rr) = (1) - (-1) = 2;  beta*h = 1
    loss = -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    chosen reward = 0.5 * 1 = 0.5; rejected reward = 0.5 * -1 = -0.5; margin 1.0; accuracy 1.
    """
    out = dpo_loss(logps(-1, -3, -2, -2), beta=0.5)
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)
    assert out.margins.item() == pytest.approx(1.0)
    assert out.accuracy.item() == 1.0


def test_dpo_label_smoothing_by_hand():
    """Same pair, eps=0.1: loss = 0.9*log(1+e^-1) + 0.1*log(1+e^1) = 0.28193553 + 0.13132617 = 0.4132617."""
    out = dpo_loss(logps(-1, -3, -2, -2), beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_ipo_loss_by_hand():
    """h = 2, beta = 0.5: (h - 1/(2*beta))^2 = (2 - 1)^2 = 1.  With beta = 0.25: (2 - 2)^2 = 0."""
    assert ipo_loss(logps(-1, -3, -2, -2), beta=0.5).loss.item() == pytest.approx(1.0)
    assert ipo_loss(logps(-1, -3, -2, -2), beta=0.25).loss.item() == pytest.approx(0.0)


def test_equal_policy_and_reference_gives_log2_and_zero_rewards():
    out = dpo_loss(logps(-4, -7, -4, -7), beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.margins.item() == 0.0
    assert out.accuracy.item() == 0.0  # a tie is not a correct ranking


def test_gradient_flows_to_policy_only_and_has_the_dpo_sign():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    out = dpo_loss(PreferenceLogps(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0])), beta=1.0)
    out.loss.backward()
    # d/dpc -log sigmoid(pc - pr) at 0 = -0.5: raising the chosen log-prob lowers the loss.
    assert pc.grad.item() == pytest.approx(-0.5)
    assert pr.grad.item() == pytest.approx(0.5)
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dpo_loss(logps(0, 0, 0, 0), beta=0), "beta must be > 0"),
        (lambda: dpo_loss(logps(0, 0, 0, 0), beta=1, label_smoothing=0.5), "label_smoothing"),
        (lambda: preference_loss("hinge", logps(0, 0, 0, 0), 1.0), "unknown preference loss"),
        (lambda: preference_loss("ipo", logps(0, 0, 0, 0), 1.0, 0.1), "sigmoid"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
