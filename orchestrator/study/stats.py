"""The study's statistics, pure functions over its rows: quality-vs-KL curves, the matched-KL
comparison, gradient-norm summaries and the sweep's α × τ grid.

Matched KL. A method can win by drifting further from its starting model, so the report leads
with win rates at equal KL. Each variant's quality-vs-KL curve is its across-seed points
(``FrontierPoint.seed is None``; if a variant has only per-seed points, their mean per step),
sorted by KL and linearly interpolated:

    at KL k between points (k0, w0) and (k1, w1):  w(k) = w0 + (k - k0) / (k1 - k0) * (w1 - w0)

and nothing outside the KL range the variant reached (no extrapolation). A variant is compared
with the reference (DPO) at the midpoint and the top of the KL range both reached. The CI bounds
are interpolated the same way: for w = a*x0 + (1-a)*x1, sd(w) <= a*sd(x0) + (1-a)*sd(x1) with
equality when the two checkpoints' errors are fully correlated, so the interpolated interval is
conservative. A CI for the *difference* needs the paired judgments; pass it in
``MatchedKLRow.difference_ci_*``, e.g. ``paired_difference(interpolate_grids(x_grids, x_kls, k),
interpolate_grids(y_grids, y_kls, k))`` from :mod:`evaluation.paired`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

from evaluation.config import CRITERIA
from evaluation.paired import interpolation_weights
from orchestrator.study.data import CriterionRow, FrontierPoint, MatchedKLRow, StudyData, SweepRow


def interpolate_at(xs: Sequence[float], ys: Sequence[float | None], x: float) -> float:
    """``y`` linearly interpolated at ``x`` (NaN outside the range of ``xs`` or where a needed y is missing)."""
    weights = interpolation_weights(xs, x)
    if not weights or any(ys[i] is None for i, _ in weights):
        return float("nan")
    return float(sum(w * ys[i] for i, w in weights))


def frontier_curve(points: Iterable[FrontierPoint], variant: str) -> list[FrontierPoint]:
    """A variant's across-seed curve, by step: its ``seed is None`` points, or else the per-step mean
    of its per-seed points (KL and win rate averaged; no CI, since per-seed CIs do not average)."""
    own = [p for p in points if p.variant == variant]
    pooled = [p for p in own if p.seed is None]
    if not pooled:
        by_step: dict[int, list[FrontierPoint]] = defaultdict(list)
        for p in own:
            by_step[p.step].append(p)
        pooled = [FrontierPoint(variant, step, sum(p.kl for p in ps) / len(ps), sum(p.win_rate for p in ps) / len(ps))
                  for step, ps in by_step.items()]
    return sorted(pooled, key=_step_order)


def _step_order(point: FrontierPoint) -> tuple[bool, int]:
    return point.step is None, point.step or 0  # an unknown step is the final one: last


def _curve_at(curve: list[FrontierPoint], kl: float) -> tuple[float, float, float]:
    xs = [p.kl for p in curve]
    return (interpolate_at(xs, [p.win_rate for p in curve], kl), interpolate_at(xs, [p.ci_low for p in curve], kl),
            interpolate_at(xs, [p.ci_high for p in curve], kl))


def matched_kl_table(frontier: Sequence[FrontierPoint], reference: str, kl_levels: Sequence[float] | None = None) -> list[MatchedKLRow]:
    """Every other variant against ``reference`` at equal KL (module docstring).

    Default levels per pair: the midpoint and the top of the KL range both curves cover. A pair
    whose ranges do not overlap gets no row."""
    ref_curve = frontier_curve(frontier, reference)
    if not ref_curve:
        return []
    rows = []
    for variant in dict.fromkeys(p.variant for p in frontier):
        if variant == reference:
            continue
        curve = frontier_curve(frontier, variant)
        low = max(min(p.kl for p in curve), min(p.kl for p in ref_curve))
        high = min(max(p.kl for p in curve), max(p.kl for p in ref_curve))
        levels = kl_levels if kl_levels is not None else ([(low + high) / 2, high] if high > low else [high] if high == low else [])
        for kl in levels:
            w, lo, hi = _curve_at(curve, kl)
            rw, rlo, rhi = _curve_at(ref_curve, kl)
            if math.isnan(w) or math.isnan(rw):
                continue
            rows.append(MatchedKLRow(variant, reference, float(kl), w, lo, hi, rw, rlo, rhi, w - rw))
    return rows


def gradnorm_summary(data: StudyData) -> list[dict]:
    """Per variant: its α, τ and the peak / final gradient norm averaged over seeds."""
    info = {v.name: v for v in data.variants}
    out = []
    for variant in dict.fromkeys(h.variant for h in data.grad_norms):
        runs = [h for h in data.grad_norms if h.variant == variant and h.values]
        if not runs:
            continue
        peaks = [max(h.values) for h in runs]
        v = info.get(variant)
        out.append({"variant": variant, "ref_update": v.ref_update if v else None, "alpha": v.alpha if v else None,
                    "tau": v.tau if v else None, "peak": sum(peaks) / len(peaks), "peak_max": max(peaks),
                    "final": sum(h.values[-1] for h in runs) / len(runs), "seeds": len(runs)})
    return out


def sweep_grid(rows: Sequence[SweepRow]) -> tuple[list[float], list[int], list[list[float]]]:
    """Soft-update trials as a grid over α (rows) and τ (columns), each cell the mean over its
    trials (seeds): NaN where no trial ran."""
    soft = [r for r in rows if r.ref_update == "soft" and r.alpha is not None and r.tau is not None]
    alphas, taus = sorted({r.alpha for r in soft}), sorted({r.tau for r in soft})
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in soft:
        cells[(r.alpha, r.tau)].append(r.metric)
    grid = [[sum(cells[(a, t)]) / len(cells[(a, t)]) if cells[(a, t)] else float("nan") for t in taus] for a in alphas]
    return alphas, taus, grid


def criteria_order(rows: Sequence[CriterionRow]) -> list[str]:
    """The criteria present, the standard ones in their usual order first, any others after, sorted."""
    criteria = [c for c in CRITERIA if any(r.criterion == c for r in rows)]
    return criteria + sorted({r.criterion for r in rows} - set(criteria))
