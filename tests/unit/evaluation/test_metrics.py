import math
from dataclasses import replace

import numpy as np
import pytest

from evaluation.metrics import (
    Outcome,
    bootstrap_ci,
    combine_orders,
    distinct_n,
    from_scores,
    length_controlled,
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



def test_length_controlled_ci_is_a_bootstrap_of_refits():
    """The LC rate's CI: rerun the whole estimator (length scaling and fit) on each resample of
    comparisons (seeded), take the 2.5% and 97.5% quantiles. Checked against one fit per resample."""
    rng = np.random.default_rng(5)
    outcomes = [Outcome(str(rng.choice(["win", "loss", "tie"], p=[0.5, 0.35, 0.15])), policy_length=int(rng.integers(5, 40)),
                        baseline_length=20) for _ in range(60)]
    lc = length_controlled(outcomes, resamples=200, seed=3)
    assert lc.win_rate == pytest.approx(length_controlled_win_rate(outcomes), abs=1e-12) and not lc.separated
    index = np.random.default_rng(3).integers(0, len(outcomes), size=(200, len(outcomes)))
    refits = [length_controlled_win_rate([outcomes[i] for i in rows]) for rows in index]
    assert (lc.ci_low, lc.ci_high) == pytest.approx(tuple(np.quantile(refits, [0.025, 0.975])), abs=1e-9)
    assert lc.ci_low < lc.win_rate < lc.ci_high
    assert length_controlled(outcomes, resamples=200, seed=3) == lc  # seeded
    keys = lc.as_metrics()
    assert set(keys) == {"eval/lc_win_rate", "eval/lc_win_rate_ci_low", "eval/lc_win_rate_ci_high", "eval/lc_separated"}


@pytest.mark.parametrize(
    "rows, separated",
    [
        ([("win", 20), ("win", 15), ("loss", 5), ("loss", 8)], True),  # every win longer than every loss
        ([("loss", 20), ("win", 5), ("tie", 12), ("loss", 12)], True),  # wins shorter; a tie on the boundary
        ([("win", 20), ("win", 15), ("loss", 5), ("loss", 16)], True),  # one long loss: overlap, yet most resamples separate (near-separation)
        ([("win", 20), ("tie", 25), ("loss", 5)], True),  # a tie beyond the wins holds the fit, not its resamples of three
        ([("win", 20), ("win", 5)], False),  # all wins: the intercept runs off, not the slope
        ([("win", 10), ("loss", 10)], False),  # no length variation
    ],
)
def test_perfect_separation_by_length_is_flagged(rows, separated):
    outcomes = [Outcome(r, policy_length=n, baseline_length=10) for r, n in rows]
    lc = length_controlled(outcomes, resamples=50)
    assert lc.separated is separated
    if separated:  # the fit diverges: the rate at equal length is not identified
        assert (lc.ci_low, lc.ci_high) == (0.0, 1.0)


def test_a_statistic_without_samples_is_absent_not_zero():
    assert math.isnan(distinct_n(["one", "two"], 2)) and math.isnan(distinct_n([], 1))  # no bigram at all: was 0.0
    assert math.isnan(mean_entropy([[], [float("nan")]])) and mean_entropy([[1.0], [float("nan")]]) == 1.0
    failed = win_rate([Outcome("api_error"), Outcome("parse_failure")])
    metrics = failed.as_metrics()
    assert metrics == {"eval/wins": 0.0, "eval/losses": 0.0, "eval/ties": 0.0, "eval/parse_failures": 1.0,
                       "eval/api_errors": 1.0, "eval/flips": 0.0, "eval/n": 0.0, "eval/total": 2.0}
    assert length_controlled([Outcome("api_error")]).as_metrics() == {}
    one = win_rate([Outcome("win")]).as_metrics()
    assert one["eval/win_rate"] == 1.0 and "eval/standard_error" not in one  # no spread from one comparison


def test_diversity_of_empty_responses_is_absent():
    from evaluation.generation import Sample
    from orchestrator.evaluate.comparison import diversity_metrics as _diversity

    empty = [Sample("1", 0, "q", "", 0, None), Sample("2", 0, "q", "", 0, None)]
    assert {k: v for k, v in _diversity(empty, "d/").items() if v == v} == {"d/mean_length_words": 0.0}


def per_prompt(outcomes: list[Outcome], samples: int) -> list[Outcome]:
    """Each outcome repeated ``samples`` times as the samples of one prompt."""
    return [replace(o, cluster=f"p{i}") for i, o in enumerate(outcomes) for _ in range(samples)]


def test_win_rate_ci_draws_prompts_not_samples():
    """Four identical samples of a prompt carry no more evidence than one: the CI and SE are those
    of one sample per prompt (same seed), not half as wide."""
    rng = np.random.default_rng(7)
    one = [Outcome(str(rng.choice(["win", "loss", "tie"], p=[0.5, 0.35, 0.15]))) for _ in range(40)]
    single, repeated = win_rate(per_prompt(one, 1), seed=2), win_rate(per_prompt(one, 4), seed=2)
    assert (repeated.ci_low, repeated.ci_high) == pytest.approx((single.ci_low, single.ci_high), abs=1e-12)
    assert repeated.standard_error == pytest.approx(single.standard_error, rel=1e-12)
    assert repeated.win_rate == pytest.approx(single.win_rate) and repeated.n == 4 * single.n
    assert single == win_rate(one, seed=2)  # without prompts, every comparison is its own prompt


def test_length_controlled_ci_draws_prompts_not_samples():
    rng = np.random.default_rng(5)
    one = [Outcome(str(rng.choice(["win", "loss", "tie"], p=[0.5, 0.35, 0.15])), policy_length=int(rng.integers(5, 40)),
                   baseline_length=20) for _ in range(40)]
    single, repeated = length_controlled(per_prompt(one, 1), resamples=300, seed=2), length_controlled(per_prompt(one, 4), resamples=300, seed=2)
    assert not single.separated and not repeated.separated
    assert repeated.win_rate == pytest.approx(single.win_rate, abs=1e-9)
    assert (repeated.ci_low, repeated.ci_high) == pytest.approx((single.ci_low, single.ci_high), abs=1e-9)


def test_near_separation_by_length_is_flagged_and_its_ci_not_reported():
    """Every win longer than every loss but one: the fit is finite (a steep slope), yet a third of
    the resamples lack that one loss and are separated, so the CI's quantiles would be where
    diverging fits stopped. Flagged like separation, CI [0, 1]."""
    rows = [("win", 20), ("win", 21), ("win", 22), ("win", 23), ("loss", 5), ("loss", 6), ("loss", 7), ("loss", 21)]
    outcomes = [Outcome(r, policy_length=n, baseline_length=10) for r, n in rows]
    lc = length_controlled(outcomes, resamples=1000)
    assert lc.separated and (lc.ci_low, lc.ci_high) == (0.0, 1.0)
    assert lc.as_metrics()["eval/lc_separated"] == 1.0
    overlapping = [Outcome(str(r), policy_length=int(n), baseline_length=20) for r, n in
                   zip(np.random.default_rng(5).choice(["win", "loss"], 60), np.random.default_rng(6).integers(5, 40, 60))]
    assert not length_controlled(overlapping, resamples=1000).separated  # no length trend: a sound CI
