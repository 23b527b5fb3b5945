"""Evaluation metrics as pure functions (numpy + sacrebleu; importable without Ray or torch).

Win rates follow the usual side-by-side conventions: a win counts 1, a tie 1/2, a loss 0; parse
failures and API errors are *excluded* from the rate and reported as counts, so a flaky judge
shows up as missing data rather than as losses. Confidence intervals are percentile bootstraps
over prompts (clusters): the samples of one prompt are drawn together, since they share the
prompt's difficulty and are not independent. The length-controlled win rate is AlpacaEval 2's minimal
length model (a logistic model of the outcome on the tanh-scaled length difference, read off at
zero difference) without its L1 penalty, instruction-difficulty term or gamed-baseline
regulariser; see :func:`length_controlled`.

A statistic with no samples is NaN here and absent from ``as_metrics`` (never 0.0).
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
    # The prompt the comparison answers: the bootstrap draws prompts, each with all its samples.
    # None: the comparison is its own prompt.
    cluster: str | None = None


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
        return _present({f"{prefix}{k}": float(v) for k, v in asdict(self).items()})


def win_rate(outcomes: Sequence[Outcome], resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """Win rate (ties = 1/2) with its standard error and a seeded percentile-bootstrap CI, both
    over prompts (``Outcome.cluster``): a prompt's samples count as one draw."""
    counts = Counter(o.result for o in outcomes)
    judged = [o for o in outcomes if o.result in OUTCOME_SCORE]
    scores = np.array([OUTCOME_SCORE[o.result] for o in judged], dtype=float)
    n = len(scores)
    flips = sum(o.flipped for o in outcomes)
    if n == 0:
        nan = float("nan")
        return WinRate(nan, nan, nan, nan, 0, 0, 0, counts["parse_failure"], counts["api_error"], flips, nan, 0, len(outcomes))
    rate = float(scores.mean())
    clusters = cluster_index(judged)
    se = cluster_standard_error(scores, clusters)
    low, high = bootstrap_ci(scores, resamples, confidence, seed, clusters)
    return WinRate(rate, se, low, high, counts["win"], counts["loss"], counts["tie"], counts["parse_failure"],
                   counts["api_error"], flips, flips / n, n, len(outcomes))


def cluster_index(outcomes: Sequence[Outcome]) -> np.ndarray:
    """Each outcome's prompt as an integer 0..G-1 (an outcome without a cluster is its own)."""
    ids: dict = {}
    return np.array([ids.setdefault(o.cluster if o.cluster is not None else ("row", i), len(ids))
                     for i, o in enumerate(outcomes)], dtype=int)


def cluster_standard_error(scores: np.ndarray, clusters: np.ndarray) -> float:
    """The cluster-robust standard error of the mean of ``scores`` (a ratio of sums over prompts);
    with one sample per prompt, std / sqrt(n). NaN with fewer than two prompts."""
    groups = int(clusters.max()) + 1
    if groups < 2:
        return float("nan")
    residuals = np.bincount(clusters, weights=scores - scores.mean(), minlength=groups)
    return float(math.sqrt(groups / (groups - 1) * (residuals**2).sum()) / len(scores))


def cluster_resample_weights(clusters: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n]: how many times each row is drawn when prompts are drawn with replacement
    (every sample of a drawn prompt comes with it)."""
    groups = int(clusters.max()) + 1
    drawn = np.random.default_rng(seed).integers(0, groups, size=(resamples, groups))
    times = np.zeros((resamples, groups))
    np.add.at(times, (np.arange(resamples)[:, None], drawn), 1.0)
    return times[:, clusters]


def bootstrap_ci(scores: np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                 clusters: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of ``scores``, drawing prompts (``clusters``: each
    score's prompt, 0..G-1; None: every score its own prompt)."""
    if clusters is None:
        clusters = np.arange(len(scores))
    weights = cluster_resample_weights(clusters, resamples, seed)
    means = (weights * scores).sum(axis=1) / weights.sum(axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


@dataclass(frozen=True)
class LengthControlled:
    """The length-controlled win rate with a percentile-bootstrap CI. ``separated``: wins separate
    perfectly (or nearly, see :func:`length_controlled`) by length, so the logistic fit diverges and ``win_rate`` is an artefact of where
    Newton's method stopped (length explains the outcomes; the rate at equal length is unidentified)."""

    win_rate: float
    ci_low: float
    ci_high: float
    separated: bool

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        if math.isnan(self.win_rate):  # no judged comparison: nothing to report, not even "not separated"
            return {}
        return _present({f"{prefix}lc_win_rate": self.win_rate, f"{prefix}lc_win_rate_ci_low": self.ci_low,
                         f"{prefix}lc_win_rate_ci_high": self.ci_high, f"{prefix}lc_separated": float(self.separated)})


def length_controlled(outcomes: Sequence[Outcome], resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                      iterations: int = 200) -> LengthControlled:
    """AlpacaEval-2-style length control, in its minimal form: fit P(policy preferred) =
    sigmoid(a + b * x) with x = tanh((len_policy - len_baseline) / std(len differences)) by logistic
    regression (Newton's method; ties enter as half a win and half a loss), and report sigmoid(a):
    the win rate the judge would give if both responses had the same length.

    This is *not* all of AlpacaEval 2's GLM: there is no L1 penalty on the coefficients, no
    instruction-difficulty term (AlpacaEval estimates one per instruction from many models on its
    own prompt set; we have neither) and no regulariser against a gamed baseline. On the same data
    it matches that minimal model (to ~0.001) but can differ from official AlpacaEval by a few
    points at small n (0.03-0.05 seen at n = 50, where AlpacaEval's cross-validated penalty often
    returns exactly 0.5).

    The CI is a seeded percentile bootstrap over prompts that reruns the whole estimator on each
    resample (like :func:`win_rate`'s CI: a drawn prompt brings all its samples). When wins separate perfectly by length the
    maximum-likelihood fit does not exist: ``separated`` says so, the rate should not be read, and
    the CI is [0, 1]. The same holds under near-separation: when more resamples than the CI's tail
    (2.5% at 95%) are separated, a few comparisons against the length trend are all that keep the
    fit finite, and the quantiles would be artefacts of diverging fits."""
    judged = [o for o in outcomes if o.result in OUTCOME_SCORE]
    if not judged:
        nan = float("nan")
        return LengthControlled(nan, nan, nan, False)
    diff = np.array([o.policy_length - o.baseline_length for o in judged], dtype=float)
    y = np.array([OUTCOME_SCORE[o.result] for o in judged], dtype=float)
    once = np.ones((1, len(y)))
    x = _length_feature(diff[None], once)[0]
    rate = float(_logistic_intercepts(x[None], y[None], once, iterations)[0])
    if _separated(x[None], y[None], once)[0]:
        # Every resample of separated data is separated (or one-sided) too: none pins the rate down, and
        # [0, 1] is the honest interval (it also spares 1000 fits that run to the iteration cap).
        return LengthControlled(rate, 0.0, 1.0, True)
    # A resample is the rows weighted by how often their prompt was drawn (rows of a prompt drawn
    # twice count twice, exactly as if they were repeated).
    weights = cluster_resample_weights(cluster_index(judged), resamples, seed)
    rows = np.broadcast_to(diff, weights.shape)
    features, outcomes_of = _length_feature(rows, weights), np.broadcast_to(y, weights.shape)
    tail = (1.0 - confidence) / 2.0
    if _separated(features, outcomes_of, weights).mean() > tail:
        # Near-separation: a few comparisons against the length trend keep the fit finite, but
        # resamples without them diverge, and the quantiles would be where those fits stopped.
        return LengthControlled(rate, 0.0, 1.0, True)
    rates = _logistic_intercepts(features, outcomes_of, weights, iterations)
    return LengthControlled(rate, float(np.quantile(rates, tail)), float(np.quantile(rates, 1.0 - tail)), False)


def length_controlled_win_rate(outcomes: Sequence[Outcome], iterations: int = 200) -> float:
    """The point estimate of :func:`length_controlled` (no bootstrap)."""
    return length_controlled(outcomes, resamples=1, iterations=iterations).win_rate


def _length_feature(diff: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """tanh(diff / std(diff)) per row, the std weighted by ``weights`` (each resample is scaled by
    its own spread, as the full sample is: the bootstrap repeats the whole estimator); rows without
    spread give 0."""
    total = weights.sum(axis=1, keepdims=True)
    mean = (weights * diff).sum(axis=1, keepdims=True) / total
    scale = np.sqrt((weights * (diff - mean) ** 2).sum(axis=1, keepdims=True) / total)
    return np.tanh(np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0))


def _logistic_intercepts(x: np.ndarray, y: np.ndarray, weights: np.ndarray, iterations: int) -> np.ndarray:
    """sigmoid(a) of ``len(x)`` independent fits of y ~ sigmoid(a + b x) (rows of x, y; each
    observation counted ``weights`` times), by Newton."""
    features = np.stack([np.ones_like(x), x], axis=-1)  # [fits, n, 2]
    theta = np.zeros((x.shape[0], 2))
    # Keeps the Newton step defined when all outcomes agree; in proportion to the data's weight, so
    # that counting every observation k times leaves the fit unchanged.
    ridge = 1e-6 * weights.sum(axis=1)[:, None, None] * np.eye(2)
    active = np.ones(x.shape[0], dtype=bool)
    for _ in range(iterations):
        f, w = features[active], weights[active]
        p = _sigmoid(np.einsum("fnk,fk->fn", f, theta[active]))
        gradient = np.einsum("fnk,fn->fk", f, w * (y[active] - p))
        hessian = np.einsum("fnk,fn,fnl->fkl", f, w * p * (1 - p), f) + ridge[active]
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        theta[active] += step
        done = np.abs(step).max(axis=1) < 1e-10
        active[np.flatnonzero(active)[done]] = False
        if not active.any():
            break
    return _sigmoid(theta[:, 0])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + e^-z), without overflow when a fit runs off


def _separated(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per fit (rows of x, y; observations of weight 0 absent): do the (half-)wins and
    (half-)losses separate by length, up to ties at the boundary?

    A tie counts on both sides, so it keeps the fit finite unless it sits on the boundary itself.
    With outcomes of only one kind, or no length variation, there is no length separation: the
    intercept alone (all wins, all losses) or nothing (equal lengths) runs off, not the slope."""
    present = weights > 0

    def lowest(mask):
        return np.where(mask, x, np.inf).min(axis=1)

    def highest(mask):
        return np.where(mask, x, -np.inf).max(axis=1)

    winning, losing = present & (y > 0), present & (y < 1)
    both = winning.any(axis=1) & losing.any(axis=1) & (lowest(present) < highest(present))
    return both & ((highest(losing) <= lowest(winning)) | (highest(winning) <= lowest(losing)))


def _present(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics that have a value (NaN: no samples, so absent)."""
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams / all n-grams over whitespace tokens of all texts (Li et al. 2016); NaN when
    there is no n-gram at all (no text of n words: nothing to be diverse or not)."""
    grams = [tuple(tokens[i : i + n]) for text in texts for tokens in [text.split()] for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def self_bleu(texts: Sequence[str]) -> float:
    """Mean sentence BLEU (sacrebleu, 0-100) of each text against all the others: higher = less diverse.
    Empty texts take no part (an empty hypothesis scores 0, which would read as diversity); NaN
    with fewer than two non-empty texts."""
    import sacrebleu

    texts = [t for t in texts if t.split()]
    if len(texts) < 2:
        return float("nan")
    scores = [sacrebleu.sentence_bleu(text, [t for j, t in enumerate(texts) if j != i]).score for i, text in enumerate(texts)]
    return float(np.mean(scores))


def mean_entropy(per_token_entropies: Iterable[Sequence[float]]) -> float:
    """Mean predictive entropy (nats) over all generated tokens of all samples (NaN: none)."""
    values = [v for sample in per_token_entropies for v in sample if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def mean_length(texts: Iterable[str]) -> float:
    lengths = [len(t.split()) for t in texts]
    return float(np.mean(lengths)) if lengths else float("nan")
