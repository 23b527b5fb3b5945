"""Comparisons paired by training seed and prompt, with a CI that covers both (numpy only).

Data. A study trains each variant once per seed s = 1..S and judges every trained policy on the
same P prompts. One comparison (variant X against a baseline such as SFT, or X against Y
directly) is a grid of outcome scores

    y[s, j] in {1 win, 0.5 tie, 0 loss},   NaN where the judge gave no outcome

(parse failures and API errors are missing data, never losses; several samples of one prompt are
averaged into their cell).

Estimate. The across-seed mean of the per-seed win rates,

    theta = (1/S) * sum_s ybar_s,   ybar_s = mean of row s over its judged prompts,

so a seed with more judge failures does not weigh less.

Why a two-way bootstrap. Prompts are crossed with seeds (the same prompt judges every seed), so
the random-effects model of the grid is

    y[s, j] = mu + a_s + b_j + e_sj,   Var a = s2_seed, Var b = s2_prompt, Var e = s2_resid,
    Var(theta) = s2_seed / S + s2_prompt / P + s2_resid / (S * P).

Resampling seeds only misses s2_prompt / P; resampling the S*P cells as if independent misses
both s2_seed / S and the prompt correlation (with a real seed effect it is much too narrow, see
the coverage test); resampling prompts separately within each seed (a nested bootstrap) treats
prompt j of seed 1 and prompt j of seed 2 as unrelated and breaks the pairing that differences
rely on. So each replicate draws S seeds with replacement and, independently, P prompts with
replacement, and recomputes theta on the S x P grid of drawn rows and columns: the drawn prompts
are the same for every drawn seed, as in the real design (the "pigeonhole" bootstrap of Owen
2007, Ann. Appl. Stat. 1:2). Its variance is, to first order,

    s2_seed / S * (S-1)/S  +  s2_prompt / P * (P-1)/P  +  about 2 * s2_resid / (S * P),

i.e. it covers both sources, counts the residual twice (conservative), and, like any bootstrap
over S clusters, shrinks the seed part by (S-1)/S: by half with 2 seeds, by a third with 3. The
CI is the percentile interval of the replicates. With one seed it is a CI over prompts only,
conditional on that trained model. ``resample_seeds=False`` gives that conditional interval for
any S (the cluster bootstrap over prompts, paired across seeds).

Method-of-moments variance components (two-way ANOVA on the prompts judged for every seed) are
reported beside the bootstrap so a reader sees which source dominates:

    MS_seed   = P * sum_s (ybar_s. - ybar)^2 / (S-1)
    MS_prompt = S * sum_j (ybar_.j - ybar)^2 / (P-1)
    MS_resid  = sum_sj (y_sj - ybar_s. - ybar_.j + ybar)^2 / ((S-1)(P-1))
    s2_resid = MS_resid,  s2_seed = (MS_seed - MS_resid) / P,  s2_prompt = (MS_prompt - MS_resid) / S

(each clipped at 0), and the analytic SE is the square root of Var(theta) above.

Matched KL. To compare two variants at equal KL, each variant's per-checkpoint grids are
interpolated cell by cell at that KL (:func:`interpolate_grids`: between checkpoints at KL k0 and
k1, w = (k - k0)/(k1 - k0) and y = (1-w) * y_k0 + w * y_k1), which keeps the seed/prompt pairing;
the mean of the interpolated grid is the interpolated win rate.

Differences. "TR-DPO minus DPO, each against SFT" pairs by seed and prompt:
d[s, j] = x[s, j] - y[s, j], missing where either is, and the same bootstrap runs on d. A prompt
where SFT is hard to beat lowers x and y alike and cancels in d, which is why the paired interval
is narrower than one built from two separate intervals.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Hashable, Iterable, Sequence

import numpy as np

from evaluation.metrics import OUTCOME_SCORE


@dataclass(frozen=True)
class ScoreGrid:
    """Outcome scores of one comparison: rows are seeds, columns prompts, NaN where no outcome."""

    scores: np.ndarray
    seeds: tuple
    prompts: tuple

    def __post_init__(self) -> None:
        if self.scores.shape != (len(self.seeds), len(self.prompts)):
            raise ValueError(f"scores {self.scores.shape} do not match {len(self.seeds)} seeds x {len(self.prompts)} prompts")

    @classmethod
    def from_records(cls, records: Iterable[tuple[Hashable, Hashable, float | str | None]]) -> "ScoreGrid":
        """``(seed, prompt_id, outcome)`` records -> grid. ``outcome`` is a score in [0, 1], an
        outcome name ("win", "tie", "loss"; "parse_failure"/"api_error" count as missing) or None.
        Several records of one (seed, prompt) cell (several samples) are averaged."""
        sums: dict[tuple, float] = {}
        counts: dict[tuple, int] = {}
        seeds: dict[Hashable, None] = {}
        prompts: dict[Hashable, None] = {}
        for seed, prompt, outcome in records:
            seeds.setdefault(seed)
            prompts.setdefault(prompt)
            score = _as_score(outcome)
            if math.isnan(score):
                continue
            sums[(seed, prompt)] = sums.get((seed, prompt), 0.0) + score
            counts[(seed, prompt)] = counts.get((seed, prompt), 0) + 1
        grid = np.full((len(seeds), len(prompts)), np.nan)
        row = {s: i for i, s in enumerate(seeds)}
        col = {p: j for j, p in enumerate(prompts)}
        for key, total in sums.items():
            grid[row[key[0]], col[key[1]]] = total / counts[key]
        return cls(grid, tuple(seeds), tuple(prompts))

    def reindex(self, seeds: Sequence, prompts: Sequence) -> np.ndarray:
        """The scores on the given seed and prompt labels, NaN where this grid has no such cell."""
        out = np.full((len(seeds), len(prompts)), np.nan)
        row = {s: i for i, s in enumerate(self.seeds)}
        col = {p: j for j, p in enumerate(self.prompts)}
        rows = [(i, row[s]) for i, s in enumerate(seeds) if s in row]
        cols = [(j, col[p]) for j, p in enumerate(prompts) if p in col]
        if rows and cols:
            (oi, si), (oj, sj) = zip(*rows), zip(*cols)
            out[np.ix_(oi, oj)] = self.scores[np.ix_(si, sj)]
        return out


def _as_score(outcome: float | str | None) -> float:
    if outcome is None:
        return float("nan")
    if isinstance(outcome, str):
        return OUTCOME_SCORE.get(outcome, float("nan"))
    return float(outcome)


@dataclass(frozen=True)
class VarianceComponents:
    """Method-of-moments estimates (module docstring); NaN with fewer than 2 seeds or prompts."""

    seed: float
    prompt: float
    residual: float
    standard_error: float  # sqrt(seed / S + prompt / P + residual / (S * P)) of the across-seed mean
    n_seeds: int
    n_prompts: int  # prompts judged for every seed (the ANOVA needs a complete grid)


@dataclass(frozen=True)
class PairedEstimate:
    mean: float  # across-seed mean of the per-seed means
    ci_low: float
    ci_high: float
    standard_error: float  # standard deviation of the bootstrap replicates
    per_seed: tuple[float, ...]
    n_seeds: int
    n_prompts: int
    n_outcomes: int  # judged cells
    confidence: float
    resamples: int
    resample_seeds: bool
    components: VarianceComponents

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Flat floats for MLflow, e.g. ``prefix="eval/paired/win_rate"`` -> ``…_ci_low``."""
        out = {prefix: self.mean, f"{prefix}_ci_low": self.ci_low, f"{prefix}_ci_high": self.ci_high,
               f"{prefix}_se": self.standard_error, f"{prefix}_n_seeds": float(self.n_seeds),
               f"{prefix}_n_prompts": float(self.n_prompts)}
        out.update({f"{prefix}_var_{k}": float(v) for k, v in asdict(self.components).items()
                    if k in ("seed", "prompt", "residual")})
        return {k: v for k, v in out.items() if not math.isnan(v)}  # no samples: absent, not NaN


def _as_array(scores: ScoreGrid | np.ndarray) -> np.ndarray:
    array = scores.scores if isinstance(scores, ScoreGrid) else np.asarray(scores, dtype=float)
    if array.ndim != 2:
        raise ValueError(f"scores must be a seeds x prompts grid, got shape {array.shape}")
    judged = ~np.isnan(array)
    # Seeds or prompts without any outcome carry no information; drawing them would only shrink
    # the effective sample of each replicate.
    return array[judged.any(axis=1)][:, judged.any(axis=0)]


def seed_mean(scores: np.ndarray) -> tuple[float, tuple[float, ...]]:
    """``(mean over seeds of the per-seed means, per-seed means)`` of a grid with NaN holes."""
    with np.errstate(invalid="ignore"):
        per_seed = np.nanmean(scores, axis=1) if scores.size else np.array([])
    return (float(per_seed.mean()) if per_seed.size else float("nan")), tuple(float(v) for v in per_seed)


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` indices was drawn, per replicate row: [B, k] draws -> [B, n] counts."""
    b = draws.shape[0]
    flat = (np.arange(b)[:, None] * n + draws).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(float)


def two_way_bootstrap(scores: np.ndarray, resamples: int = 2000, seed: int = 0, resample_seeds: bool = True) -> np.ndarray:
    """Replicates of the across-seed mean under the two-way bootstrap (module docstring).

    Drawing index j c times is the same as weighting column j by c, so each replicate is a pair
    of count vectors (seeds W, prompts V) and, with M the judged mask,

        ybar*_s = sum_j V_j M_sj y_sj / sum_j V_j M_sj,   theta* = sum_s W_s ybar*_s / sum_s W_s,

    over the drawn seeds whose drawn prompts include a judged one (replicates with none are NaN).
    All replicates come from one matrix product instead of a Python loop."""
    s, p = scores.shape
    rng = np.random.default_rng(seed)
    seed_counts = _counts(rng.integers(0, s, size=(resamples, s)), s) if resample_seeds else np.ones((resamples, s))
    prompt_counts = _counts(rng.integers(0, p, size=(resamples, p)), p)
    judged = ~np.isnan(scores)
    numerator = prompt_counts @ np.where(judged, scores, 0.0).T  # [B, S]
    denominator = prompt_counts @ judged.T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seed = numerator / denominator
        usable = seed_counts * np.isfinite(per_seed)
        return (usable * np.nan_to_num(per_seed)).sum(1) / usable.sum(1)


def variance_components(scores: ScoreGrid | np.ndarray) -> VarianceComponents:
    """Two-way random-effects ANOVA of the grid's complete prompts (module docstring)."""
    grid = _as_array(scores)
    grid = grid[:, ~np.isnan(grid).any(axis=0)] if grid.size else grid
    s, p = grid.shape
    if s < 2 or p < 2:
        nan = float("nan")
        return VarianceComponents(nan, nan, nan, nan, s, p)
    grand = grid.mean()
    rows, cols = grid.mean(axis=1), grid.mean(axis=0)
    ms_seed = p * ((rows - grand) ** 2).sum() / (s - 1)
    ms_prompt = s * ((cols - grand) ** 2).sum() / (p - 1)
    ms_resid = ((grid - rows[:, None] - cols[None, :] + grand) ** 2).sum() / ((s - 1) * (p - 1))
    # Clipped at 0: a negative moment estimate means "no detectable component", not a negative variance.
    seed_var, prompt_var = max(0.0, (ms_seed - ms_resid) / p), max(0.0, (ms_prompt - ms_resid) / s)
    se = math.sqrt(seed_var / s + prompt_var / p + ms_resid / (s * p))
    return VarianceComponents(float(seed_var), float(prompt_var), float(ms_resid), se, s, p)


def paired_mean(scores: ScoreGrid | np.ndarray, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                resample_seeds: bool = True) -> PairedEstimate:
    """Across-seed mean of one comparison's grid with its two-way bootstrap CI.

    Use it for a win rate against a baseline (X vs SFT) and for a direct comparison (X vs Y
    judged side by side). Seeded: the same input and ``seed`` give the same interval."""
    grid = _as_array(scores)
    mean, per_seed = seed_mean(grid)
    if grid.size == 0:
        nan = float("nan")
        return PairedEstimate(nan, nan, nan, nan, (), 0, 0, 0, confidence, resamples, resample_seeds,
                              variance_components(grid))
    replicates = two_way_bootstrap(grid, resamples, seed, resample_seeds)
    replicates = replicates[~np.isnan(replicates)]
    tail = (1.0 - confidence) / 2.0
    low, high = (float(np.quantile(replicates, q)) for q in (tail, 1.0 - tail))
    se = float(replicates.std(ddof=1)) if replicates.size > 1 else float("nan")
    return PairedEstimate(mean, low, high, se, per_seed, grid.shape[0], grid.shape[1], int((~np.isnan(grid)).sum()),
                          confidence, resamples, resample_seeds, variance_components(grid))


def paired_difference(x: ScoreGrid | np.ndarray, y: ScoreGrid | np.ndarray, **kwargs) -> PairedEstimate:
    """``x - y`` for two variants judged against a common baseline, paired by seed and prompt.

    With ``ScoreGrid`` inputs the cells are matched by their labels (seeds in either, prompts in
    either; a cell missing on one side is missing in the difference); plain arrays must already be
    aligned. ``kwargs`` as in :func:`paired_mean`. The mean is the across-seed mean of the per-seed
    differences of the paired cells."""
    if isinstance(x, ScoreGrid) and isinstance(y, ScoreGrid):
        seeds = tuple(dict.fromkeys(x.seeds + y.seeds))
        prompts = tuple(dict.fromkeys(x.prompts + y.prompts))
        xs, ys = x.reindex(seeds, prompts), y.reindex(seeds, prompts)
    else:
        xs, ys = np.asarray(getattr(x, "scores", x), dtype=float), np.asarray(getattr(y, "scores", y), dtype=float)
        if xs.shape != ys.shape:
            raise ValueError(f"unlabelled grids must have the same shape, got {xs.shape} and {ys.shape}")
    return paired_mean(xs - ys, **kwargs)


def interpolation_weights(xs: Sequence[float], x: float) -> list[tuple[int, float]]:
    """Linear-interpolation weights at ``x`` as ``[(index into xs, weight), …]`` (weights sum to 1).

    ``xs`` need not be sorted; ``[]`` when ``x`` lies outside ``[min(xs), max(xs)]`` (no
    extrapolation) or is NaN. Equal x values share the weight of their position equally, i.e. they
    are averaged. Apply the weights to anything measured at those points: values, CI bounds, or
    whole per-(seed, prompt) score grids for a paired difference."""
    finite = [(v, i) for i, v in enumerate(xs) if v is not None and math.isfinite(v)]
    if not finite or x is None or not math.isfinite(x):
        return []
    groups: dict[float, list[int]] = defaultdict(list)
    for v, i in finite:
        groups[v].append(i)
    keys = sorted(groups)
    if x < keys[0] or x > keys[-1]:
        return []

    def spread(key: float, weight: float) -> list[tuple[int, float]]:
        return [(i, weight / len(groups[key])) for i in groups[key]]

    for lo, hi in zip(keys, keys[1:]):
        if lo <= x <= hi:
            a = (x - lo) / (hi - lo)
            return [pair for pair in spread(lo, 1.0 - a) + spread(hi, a) if pair[1] > 0] or spread(lo, 1.0)
    return spread(keys[0], 1.0)  # a single distinct x, equal to x


def interpolate_grids(grids: Sequence[ScoreGrid | np.ndarray], xs: Sequence[float], at: float) -> ScoreGrid | np.ndarray | None:
    """The cell-by-cell linear interpolation at ``at`` of grids measured at ``xs`` (e.g. one grid per
    checkpoint, ``xs`` their sampled KLs); None outside the range of ``xs``. Labelled grids are
    aligned on the union of their labels (a cell missing in a grid that is needed stays missing);
    plain arrays must be aligned already."""
    weights = interpolation_weights(xs, at)
    if not weights:
        return None
    chosen = [(grids[i], w) for i, w in weights]
    if all(isinstance(g, ScoreGrid) for g, _ in chosen):
        seeds = tuple(dict.fromkeys(s for g, _ in chosen for s in g.seeds))
        prompts = tuple(dict.fromkeys(p for g, _ in chosen for p in g.prompts))
        return ScoreGrid(sum(w * g.reindex(seeds, prompts) for g, w in chosen), seeds, prompts)
    return sum(w * np.asarray(getattr(g, "scores", g), dtype=float) for g, w in chosen)
