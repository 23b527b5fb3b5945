"""Evaluation metrics as pure functions (numpy + sacrebleu; importable without Ray or torch).

Win rates follow the usual side-by-side conventions: a win counts 1, a tie 1/2, a loss 0; parse
failures and API errors are *excluded* from the rate and reported as counts, so a flaky judge
shows up as missing data rather than as losses. Confidence intervals are percentile bootstraps
over comparisons (Arena-Hard style); the length-controlled win rate follows AlpacaEval 2: a
logistic model of the outcome on the (tanh-scaled) length difference, read off at zero difference.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}


@dataclass(frozen=True)
class Outcome:
    """One comparison after combining both judge orders: win / loss / tie / parse_failure / api_error."""

    result: str
    flipped: bool = False  # the two orders disagreed (position bias); such pairs count as ties
    policy_length: int = 0
    baseline_length: int = 0


def combine_orders(verdict_policy_first: str | None, verdict_baseline_first: str | None) -> Outcome:
    """Combine the verdicts of the two presentation orders into one outcome for the policy.

    Order 1 shows (A=policy, B=baseline); order 2 shows (A=baseline, B=policy). Each verdict is
    "A", "B", "tie", None (parse failure) or "error" (the API call failed for good).
    Both agree on a side -> that side wins; a tie in either or disagreement -> tie (disagreement
    also counts as a position flip, MT-Bench style)."""
    verdicts = (verdict_policy_first, verdict_baseline_first)
    if "error" in verdicts:
        return Outcome("api_error")
    if None in verdicts:
        return Outcome("parse_failure")
    first = {"A": "win", "B": "loss", "tie": "tie"}[verdict_policy_first]
    second = {"A": "loss", "B": "win", "tie": "tie"}[verdict_baseline_first]
    if first == second:
        return Outcome(first)
    if "tie" in (first, second):
        return Outcome("tie")
    return Outcome("tie", flipped=True)


def single_order(verdict: str | None, policy_first: bool) -> Outcome:
    if verdict == "error":
        return Outcome("api_error")
    if verdict is None:
        return Outcome("parse_failure")
    if verdict == "tie":
        return Outcome("tie")
    return Outcome("win" if (verdict == "A") == policy_first else "loss")


def from_scores(policy_score: float | None, baseline_score: float | None, tie_margin: float = 0.0) -> Outcome:
    """Outcome from two scalar scores (reward model, gold function): order cannot matter."""
    if policy_score is None or baseline_score is None or any(map(math.isnan, (policy_score, baseline_score))):
        return Outcome("api_error")
    if abs(policy_score - baseline_score) <= tie_margin:
        return Outcome("tie")
    return Outcome("win" if policy_score > baseline_score else "loss")


@dataclass(frozen=True)
class WinRate:
    win_rate: float
    standard_error: float
    ci_low: float
    ci_high: float
    wins: int
    losses: int
    ties: int
    parse_failures: int
    api_errors: int
    flips: int
    flip_rate: float
    n: int  # comparisons that produced an outcome (wins + losses + ties)
    total: int  # all comparisons, failures included

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def win_rate(outcomes: Sequence[Outcome], resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Win rate (ties = 1/2) with its standard error and a seeded percentile-bootstrap CI."""
    counts = Counter(o.result for o in outcomes)
    scores = np.array([OUTCOME_SCORE[o.result] for o in outcomes if o.result in OUTCOME_SCORE], dtype=float)
    n = len(scores)
    flips = sum(o.flipped for o in outcomes)
    judged_both = sum(o.result in OUTCOME_SCORE for o in outcomes)
    if n == 0:
        nan = float("nan")
        return WinRate(nan, nan, nan, nan, 0, 0, 0, counts["parse_failure"], counts["api_error"], flips, nan, 0, len(outcomes))
    rate = float(scores.mean())
    se = float(scores.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    low, high = bootstrap_ci(scores, resamples, confidence, seed)
    return WinRate(rate, se, low, high, counts["win"], counts["loss"], counts["tie"], counts["parse_failure"],
                   counts["api_error"], flips, flips / judged_both, n, len(outcomes))


def bootstrap_ci(scores: np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(resamples, len(scores)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def length_controlled_win_rate(outcomes: Sequence[Outcome], iterations: int = 200) -> float:
    """AlpacaEval-2-style length control: fit P(policy preferred) = sigmoid(a + b * x) with
    x = tanh((len_policy - len_baseline) / std(len differences)) by logistic regression (Newton's
    method; ties enter as half a win and half a loss), and report sigmoid(a): the win rate the
    judge would give if both responses had the same length."""
    rows = [(o.policy_length - o.baseline_length, OUTCOME_SCORE[o.result]) for o in outcomes if o.result in OUTCOME_SCORE]
    if not rows:
        return float("nan")
    diff = np.array([d for d, _ in rows], dtype=float)
    y = np.array([s for _, s in rows], dtype=float)
    scale = diff.std()
    x = np.tanh(diff / scale) if scale > 0 else np.zeros_like(diff)
    features = np.stack([np.ones_like(x), x], axis=1)
    theta = np.zeros(2)
    ridge = 1e-6 * np.eye(2)  # keeps the Newton step defined when all outcomes agree
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-features @ theta))
        gradient = features.T @ (y - p)
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + ridge
        step = np.linalg.solve(hessian, gradient)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1.0 / (1.0 + math.exp(-theta[0])))


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams / all n-grams over whitespace tokens of all texts (Li et al. 2016)."""
    grams = [tuple(tokens[i : i + n]) for text in texts for tokens in [text.split()] for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: Sequence[str]) -> float:
    """Mean sentence BLEU (sacrebleu, 0-100) of each text against all the others: higher = less diverse."""
    import sacrebleu

    if len(texts) < 2:
        return float("nan")
    scores = [sacrebleu.sentence_bleu(text, [t for j, t in enumerate(texts) if j != i]).score for i, text in enumerate(texts)]
    return float(np.mean(scores))


def mean_entropy(per_token_entropies: Iterable[Sequence[float]]) -> float:
    """Mean predictive entropy (nats) over all generated tokens of all samples."""
    values = [v for sample in per_token_entropies for v in sample]
    return float(np.mean(values)) if values else float("nan")


def mean_length(texts: Iterable[str]) -> float:
    lengths = [len(t.split()) for t in texts]
    return float(np.mean(lengths)) if lengths else float("nan")
