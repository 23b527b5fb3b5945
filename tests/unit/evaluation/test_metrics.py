import math

import numpy as np
import pytest

from evaluation.metrics import (
    Outcome,
    bootstrap_ci,
    combine_orders,
    distinct_n,
    from_scores,
    length_controlled_win_rate,
    mean_entropy,
    self_bleu,
    single_order,
    win_rate,
)


@pytest.mark.parametrize(
    "first, second, expected",
    [
        ("A", "B", Outcome("win")),               # policy shown first wins, then policy shown second wins
        ("B", "A", Outcome("loss")),
        ("A", "A", Outcome("tie", flipped=True)),  # the judge always picks the first slot: position bias
        ("B", "B", Outcome("tie", flipped=True)),
        ("tie", "B", Outcome("tie")),
        ("tie", "tie", Outcome("tie")),
        (None, "B", Outcome("parse_failure")),
        ("A", "error", Outcome("api_error")),
    ],
)
def test_both_order_combination(first, second, expected):
    assert combine_orders(first, second) == expected


def test_single_order_and_scores():
    assert single_order("A", policy_first=True).result == "win"
    assert single_order("A", policy_first=False).result == "loss"
    assert single_order(None, policy_first=True).result == "parse_failure"
    assert from_scores(2.0, 1.0).result == "win" and from_scores(1.0, 1.0).result == "tie"
    assert from_scores(1.0, 1.05, tie_margin=0.1).result == "tie" and from_scores(None, 1.0).result == "api_error"


def test_win_rate_counts_se_and_flip_rate_by_hand():
    """[win, win, tie(flip), loss, parse failure, api error]:
    scores 1, 1, 0.5, 0 -> rate 2.5 / 4 = 0.625;
    sample std: deviations .375 .375 -.125 -.625, squares sum .6875, /3 = .229167, sqrt = .478714;
    SE = .478714 / sqrt(4) = .239357; flip rate = 1 flip / 4 judged = 0.25; failures are not losses."""
    outcomes = [Outcome("win"), Outcome("win"), Outcome("tie", flipped=True), Outcome("loss"),
                Outcome("parse_failure"), Outcome("api_error")]
    result = win_rate(outcomes, resamples=2000, seed=1)
    assert result.win_rate == pytest.approx(0.625)
    assert result.standard_error == pytest.approx(0.239357, abs=1e-6)
    assert (result.wins, result.losses, result.ties, result.parse_failures, result.api_errors) == (2, 1, 1, 1, 1)
    assert result.flips == 1 and result.flip_rate == pytest.approx(0.25)
    assert result.n == 4 and result.total == 6
    assert result.ci_low <= 0.625 <= result.ci_high
    assert win_rate(outcomes, resamples=2000, seed=1) == result  # seeded


def test_bootstrap_ci_degenerate_and_width():
    assert bootstrap_ci(np.ones(50)) == (1.0, 1.0)
    low, high = bootstrap_ci(np.array([1.0, 0.0] * 200), resamples=4000, seed=0)
    # Normal approximation: 0.5 +- 1.96 * 0.5 / sqrt(400) = 0.5 +- 0.049
    assert low == pytest.approx(0.451, abs=0.01) and high == pytest.approx(0.549, abs=0.01)


def test_length_controlled_win_rate_by_hand():
    """Longer policy answers (x = +c): 3 wins, 1 loss -> 3/4; shorter (x = -c): 1 win, 1 loss -> 1/2.
    The logistic fit passes through both: a + bc = logit(3/4) = ln 3, a - bc = 0, so a = ln(3)/2 and
    the length-controlled rate is sigmoid(ln(3)/2) = sqrt(3) / (1 + sqrt(3)) = 0.633975,
    below the raw 4/6 = 0.667 that long answers inflated."""
    outcomes = [Outcome(r, policy_length=20, baseline_length=10) for r in ("win", "win", "win", "loss")]
    outcomes += [Outcome(r, policy_length=10, baseline_length=20) for r in ("win", "loss")]
    assert length_controlled_win_rate(outcomes) == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-6)
    no_length_effect = [Outcome("win", policy_length=5, baseline_length=5)] * 3 + [Outcome("loss", policy_length=5, baseline_length=5)]
    assert length_controlled_win_rate(no_length_effect) == pytest.approx(0.75, abs=1e-6)


def test_diversity_by_hand():
    """distinct-1 of 'a b a' + 'a b': unigrams a b a a b -> 2 unique / 5; bigrams (a b)(b a)(a b) -> 2 / 3."""
    assert distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5)
    assert distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(100.0)
    assert self_bleu(["alpha beta gamma delta", "one two three four", "red green blue cyan"]) == pytest.approx(0.0, abs=1e-6)
    """Entropies (0.5, 1.5) and (1.0,): mean over the three tokens = 3.0 / 3 = 1.0."""
    assert mean_entropy([[0.5, 1.5], [1.0]]) == pytest.approx(1.0)

