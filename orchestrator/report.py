"""One self-contained HTML report per study: tables, figures, and the matched-KL comparison first.

    python -m orchestrator.report --example /tmp/study    # writes /tmp/study/report.html from made-up data

Input is a plain :class:`StudyData` (JSON round-trip: :meth:`StudyData.save` / :meth:`StudyData.load`,
so a report can be rebuilt from a logged artifact). :func:`build_report` writes ``report.html``
and one PNG per figure beside it; each PNG is also embedded as a base64 data URI, so the HTML
alone shows everything (no scripts, no external CSS, fonts or images). A section without data is
replaced by a one-line note (``<p class="missing" id="missing-…">``), never a broken image.
Stable ids: figures ``fig-frontier``, ``fig-winrates``, ``fig-criteria``, ``fig-gradnorm``,
``fig-gradnorm-peak``, ``fig-kl-steps``, ``fig-diversity``, ``fig-sweep-heatmap``, ``fig-sweep-tau``;
tables ``tbl-matched-kl``, ``tbl-end-of-training``, ``tbl-winrates``, ``tbl-criteria``,
``tbl-gradnorm``, ``tbl-diversity``, ``tbl-sweep``, ``tbl-variants``.

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

import base64
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Sequence

from evaluation.paired import interpolation_weights

CRITERIA = ("coherence", "correctness", "level_of_detail", "helpfulness", "harmlessness")


# ------------------------------------------------------------------------------------------- data


@dataclass
class VariantInfo:
    name: str
    ref_update: str  # none | soft | hard
    alpha: float | None = None
    tau: int | None = None


@dataclass
class WinRateRow:
    variant: str
    baseline: str
    win_rate: float  # across-seed mean
    ci_low: float
    ci_high: float
    n: int  # judged comparisons
    lc_win_rate: float | None = None  # length-controlled
    lc_ci_low: float | None = None
    lc_ci_high: float | None = None
    seeds: int | None = None


@dataclass
class CriterionRow:
    variant: str
    criterion: str  # one of CRITERIA
    win_rate: float
    ci_low: float | None = None
    ci_high: float | None = None
    baseline: str = "sft"


@dataclass
class FrontierPoint:
    """One checkpoint's quality vs its sampled KL from the starting model; seed None = across seeds."""

    variant: str
    step: int | None  # None: the final policy of a run whose last step is not known
    kl: float
    win_rate: float  # against the study's baseline (SFT)
    ci_low: float | None = None
    ci_high: float | None = None
    seed: int | None = None
    kl_se: float | None = None


@dataclass
class History:
    """A per-step series of one variant and seed (gradient norm, KL to the initial model)."""

    variant: str
    seed: int | None
    steps: list[int]
    values: list[float]


@dataclass
class DiversityRow:
    variant: str
    self_bleu: float | None = None
    distinct_1: float | None = None
    distinct_2: float | None = None
    entropy: float | None = None


@dataclass
class SweepRow:
    ref_update: str
    alpha: float | None
    tau: int | None
    metric: float


@dataclass
class MatchedKLRow:
    variant: str
    reference: str
    kl: float
    win_rate: float
    ci_low: float
    ci_high: float
    reference_win_rate: float
    reference_ci_low: float
    reference_ci_high: float
    difference: float
    difference_ci_low: float | None = None
    difference_ci_high: float | None = None


_ROW_TYPES = {
    "variants": VariantInfo, "win_rates": WinRateRow, "criteria": CriterionRow, "frontier": FrontierPoint,
    "grad_norms": History, "kl_histories": History, "diversity": DiversityRow, "sweep": SweepRow, "matched_kl": MatchedKLRow,
}


@dataclass
class StudyData:
    title: str = "TR-DPO study"
    summary: dict[str, str] = field(default_factory=dict)  # shown as a key/value list under the title
    variants: list[VariantInfo] = field(default_factory=list)
    baseline: str = "sft"  # what the frontier's win rates are measured against
    reference_variant: str = "dpo"  # what matched-KL comparisons are against
    win_rates: list[WinRateRow] = field(default_factory=list)
    criteria: list[CriterionRow] = field(default_factory=list)
    frontier: list[FrontierPoint] = field(default_factory=list)
    grad_norms: list[History] = field(default_factory=list)
    kl_histories: list[History] = field(default_factory=list)
    diversity: list[DiversityRow] = field(default_factory=list)
    sweep: list[SweepRow] = field(default_factory=list)
    sweep_metric: str = "metric"
    sweep_mode: str = "max"  # max | min: which end of the sweep metric is better
    matched_kl: list[MatchedKLRow] | None = None  # None: computed from the frontier
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StudyData":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown StudyData fields: {sorted(unknown)}")
        kwargs = dict(data)
        for name, row_type in _ROW_TYPES.items():
            if kwargs.get(name) is not None:
                kwargs[name] = [row_type(**row) for row in kwargs[name]]
        return cls(**kwargs)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> "StudyData":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------ interpolation (pure functions)


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


# ----------------------------------------------------------------------------------------- figures

_FIGSIZE = (8.0, 4.2)


def _new_figure(width: float = _FIGSIZE[0], height: float = _FIGSIZE[1]):
    # A bare Figure (no pyplot): no global state, nothing left open between reports.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _colors(data: StudyData) -> dict[str, str]:
    names = [v.name for v in data.variants]
    for group in (data.win_rates, data.frontier, data.grad_norms, data.kl_histories, data.diversity, data.criteria):
        names += [row.variant for row in group]
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    return {name: palette[i % len(palette)] for i, name in enumerate(dict.fromkeys(names))}


def _err(value: float, low: float | None, high: float | None) -> list[list[float]] | None:
    """Error bar lengths; None (no bar) when the interval is unknown, never a bar of length 0."""
    if low is None or high is None or any(map(math.isnan, (value, low, high))):
        return None
    return [[max(0.0, value - low)], [max(0.0, high - value)]]


def figure_frontier(data: StudyData, matched: Sequence[MatchedKLRow] = ()):
    """Quality vs KL: each variant's across-seed curve with CIs, per-seed points faint, the matched-KL levels dashed."""
    colors, fig = _colors(data), _new_figure(8.0, 4.8)
    ax = fig.add_subplot()
    for variant in dict.fromkeys(p.variant for p in data.frontier):
        color = colors[variant]
        seeds = [p for p in data.frontier if p.variant == variant and p.seed is not None]
        ax.scatter([p.kl for p in seeds], [p.win_rate for p in seeds], color=color, alpha=0.35, s=14, marker="x")
        curve = frontier_curve(data.frontier, variant)
        ax.plot([p.kl for p in curve], [p.win_rate for p in curve], "-o", color=color, label=variant, ms=4)
        for p in curve:
            ax.errorbar([p.kl], [p.win_rate], yerr=_err(p.win_rate, p.ci_low, p.ci_high), color=color, capsize=2, lw=1)
        last = curve[-1]
        ax.annotate("final" if last.step is None else f"step {last.step}", (last.kl, last.win_rate), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    for kl in sorted({round(r.kl, 6) for r in matched}):
        ax.axvline(kl, color="0.5", ls="--", lw=0.8)
    ax.axhline(0.5, color="0.6", ls=":", lw=0.8)
    ax.set_xlabel("sampled KL from the starting model (nats per response)")
    ax.set_ylabel(f"win rate vs {data.baseline}")
    ax.set_title("Quality vs KL (lines: mean over seeds with CI; x: single seeds; dashed: matched-KL levels)", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def figure_winrates(data: StudyData):
    rows = data.win_rates
    colors, fig = _colors(data), _new_figure(8.0, 0.9 + 0.38 * len(rows))
    ax = fig.add_subplot()
    for y, row in enumerate(rows):
        ax.errorbar([row.win_rate], [y], xerr=_err(row.win_rate, row.ci_low, row.ci_high), fmt="o", color=colors[row.variant], capsize=3)
        if row.lc_win_rate is not None and not math.isnan(row.lc_win_rate):
            ax.plot([row.lc_win_rate], [y], marker="D", mfc="none", color=colors[row.variant], ms=6)
    ax.set_yticks(range(len(rows)), [f"{r.variant} vs {r.baseline}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.5, color="0.6", ls=":", lw=0.8)
    ax.set_xlabel("win rate (dots: mean over seeds with CI; open diamonds: length-controlled)")
    return fig


def figure_criteria(data: StudyData):
    colors, fig = _colors(data), _new_figure()
    ax = fig.add_subplot()
    criteria = [c for c in CRITERIA if any(r.criterion == c for r in data.criteria)]
    criteria += sorted({r.criterion for r in data.criteria} - set(criteria))
    variants = list(dict.fromkeys(r.variant for r in data.criteria))
    width = 0.8 / max(1, len(variants))
    for k, variant in enumerate(variants):
        for i, criterion in enumerate(criteria):
            row = next((r for r in data.criteria if r.variant == variant and r.criterion == criterion), None)
            if row is None:
                continue
            ax.bar(i + (k - (len(variants) - 1) / 2) * width, row.win_rate, width, color=colors[variant],
                   yerr=_err(row.win_rate, row.ci_low, row.ci_high), capsize=2, label=variant if i == 0 else None)
    ax.set_xticks(range(len(criteria)), [c.replace("_", " ") for c in criteria])
    ax.axhline(0.5, color="0.3", ls=":", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate vs {data.criteria[0].baseline}")
    ax.legend(fontsize=8)
    return fig


def _draw_histories(ax, histories: Sequence[History], colors: dict[str, str]) -> None:
    labelled = set()
    for h in histories:
        ax.plot(h.steps, h.values, color=colors[h.variant], lw=1, alpha=0.8, label=None if h.variant in labelled else h.variant)
        labelled.add(h.variant)
    values = [v for h in histories for v in h.values if v is not None and math.isfinite(v)]
    # Spiky gradient norms hide everything else on a linear axis.
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8)


def _log2_ticks(ax, taus: Sequence[int]) -> None:
    """τ spans powers of two; label the τ values themselves, not 2^k."""
    ax.set_xscale("log", base=2)
    if taus:
        ax.set_xticks(sorted(set(taus)), [str(t) for t in sorted(set(taus))])
        ax.minorticks_off()


def figure_gradnorm(data: StudyData):
    colors, fig = _colors(data), _new_figure()
    ax = fig.add_subplot()
    _draw_histories(ax, data.grad_norms, colors)
    ax.set_ylabel("gradient norm (pre-clip)")
    ax.set_title("Gradient norm per variant (one line per seed)", fontsize=9)
    return fig


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


def figure_gradnorm_peak(data: StudyData):
    """Peak gradient norm (mean over seeds) against α (hard = α 1) and against τ; DPO as a line."""
    colors, fig = _colors(data), _new_figure(8.0, 3.6)
    ax_alpha, ax_tau = fig.subplots(1, 2, sharey=True)
    markers = {"soft": "o", "hard": "s"}
    for row in gradnorm_summary(data):
        if row["ref_update"] in (None, "none"):
            for ax in (ax_alpha, ax_tau):
                ax.axhline(row["peak"], color=colors[row["variant"]], ls="--", lw=1, label=f"{row['variant']} (no update)")
            continue
        alpha = 1.0 if row["ref_update"] == "hard" else row["alpha"]
        kw = dict(color=colors[row["variant"]], marker=markers.get(row["ref_update"], "^"), ls="none", ms=7)
        if alpha is not None:
            ax_alpha.plot([alpha], [row["peak"]], label=row["variant"], **kw)
        if row["tau"] is not None:
            ax_tau.plot([row["tau"]], [row["peak"]], **kw)
    ax_alpha.set_xlabel("α (hard update = 1)")
    ax_alpha.set_xlim(0, 1.05)
    ax_tau.set_xlabel("τ (steps between reference updates)")
    _log2_ticks(ax_tau, [r["tau"] for r in gradnorm_summary(data) if r["tau"] is not None])
    ax_alpha.set_ylabel("peak gradient norm (mean over seeds)")
    ax_alpha.legend(fontsize=7)
    return fig


def figure_kl_steps(data: StudyData):
    colors, fig = _colors(data), _new_figure()
    ax = fig.add_subplot()
    _draw_histories(ax, data.kl_histories, colors)
    ax.set_ylabel("KL to the initial model (per token)")
    ax.set_title("KL to the initial model over training (one line per seed)", fontsize=9)
    return fig


_DIVERSITY = (("self_bleu", "self-BLEU (lower = more diverse)"), ("distinct_1", "distinct-1"),
              ("distinct_2", "distinct-2"), ("entropy", "mean entropy (nats)"))


def figure_diversity(data: StudyData):
    colors, fig = _colors(data), _new_figure(9.0, 3.0)
    axes = fig.subplots(1, len(_DIVERSITY))
    for ax, (key, label) in zip(axes, _DIVERSITY):
        rows = [r for r in data.diversity if getattr(r, key) is not None]
        ax.bar(range(len(rows)), [getattr(r, key) for r in rows], color=[colors[r.variant] for r in rows])
        ax.set_xticks(range(len(rows)), [r.variant for r in rows], rotation=45, ha="right", fontsize=7)
        ax.set_title(label, fontsize=8)
    return fig


def _sweep_grid(rows: Sequence[SweepRow]) -> tuple[list[float], list[int], list[list[float]]]:
    soft = [r for r in rows if r.ref_update == "soft" and r.alpha is not None and r.tau is not None]
    alphas, taus = sorted({r.alpha for r in soft}), sorted({r.tau for r in soft})
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in soft:
        cells[(r.alpha, r.tau)].append(r.metric)
    grid = [[sum(cells[(a, t)]) / len(cells[(a, t)]) if cells[(a, t)] else float("nan") for t in taus] for a in alphas]
    return alphas, taus, grid


def figure_sweep_heatmap(data: StudyData):
    import numpy as np

    alphas, taus, grid = _sweep_grid(data.sweep)
    fig = _new_figure(1.6 + 0.9 * len(taus), 1.2 + 0.55 * len(alphas))
    ax = fig.add_subplot()
    values = np.array(grid, dtype=float)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis_r" if data.sweep_mode == "min" else "viridis", aspect="auto")
    for i in range(len(alphas)):
        for j in range(len(taus)):
            if not math.isnan(values[i, j]):
                # Dark text on the bright end of the colour map, white on the dark end.
                bright = float(image.norm(values[i, j])) > 0.6 if data.sweep_mode == "max" else float(image.norm(values[i, j])) < 0.4
                ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=7, color="k" if bright else "w")
    ax.set_xticks(range(len(taus)), [str(t) for t in taus])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("τ")
    ax.set_ylabel("α (soft update)")
    fig.colorbar(image, ax=ax, label=data.sweep_metric)
    return fig


def figure_sweep_tau(data: StudyData):
    fig = _new_figure(6.0, 3.4)
    ax = fig.add_subplot()
    hard = sorted((r for r in data.sweep if r.ref_update == "hard" and r.tau is not None), key=lambda r: r.tau)
    by_tau: dict[int, list[float]] = defaultdict(list)
    for r in hard:
        by_tau[r.tau].append(r.metric)
    ax.plot(list(by_tau), [sum(v) / len(v) for v in by_tau.values()], "-s", label="hard update")
    none = [r.metric for r in data.sweep if r.ref_update == "none"]
    if none:
        ax.axhline(sum(none) / len(none), color="0.4", ls="--", label="no update (DPO)")
    _log2_ticks(ax, list(by_tau))
    ax.set_xlabel("τ (steps between hard updates)")
    ax.set_ylabel(data.sweep_metric)
    ax.legend(fontsize=8)
    return fig


# -------------------------------------------------------------------------------------------- HTML


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _with_ci(value, low, high) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return _fmt(value)
    return f"{_fmt(value)} <span class=ci>[{_fmt(low)}, {_fmt(high)}]</span>"


def _table(table_id: str, header: Sequence[str], rows: Iterable[Sequence[str]], caption: str) -> str:
    """Cells are HTML already (escaped by _fmt / _with_ci or html.escape)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _missing(section: str, text: str) -> str:
    return f'<p class="missing" id="missing-{section}">{html.escape(text)}</p>'


class _Figures:
    """Renders figures to PNG files and to data URIs."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.paths: list[Path] = []

    def html(self, fig_id: str, fig, caption: str) -> str:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        png = buffer.getvalue()
        path = self.out_dir / f"{fig_id}.png"
        path.write_bytes(png)
        self.paths.append(path)
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return (f'<figure id="{fig_id}"><img src="{uri}" alt="{html.escape(caption)}">'
                f'<figcaption>{html.escape(caption)} <a href="{path.name}">{path.name}</a></figcaption></figure>')


def _name(text: str) -> str:
    return html.escape(str(text))


def _section_matched(data: StudyData, matched: list[MatchedKLRow]) -> str:
    parts = ['<h2 id="sec-matched-kl">TR-DPO vs DPO at matched KL, and at the end of training</h2>',
             f"<p>Win rates against {_name(data.baseline)} read off each variant's quality-vs-KL curve at the same KL "
             f"from the starting model (linear interpolation between checkpoints, no extrapolation; interpolated CIs "
             f"are conservative). Beside it: the end-of-training comparison, where variants may sit at different KLs.</p>",
             '<div class="pair">']
    if matched:
        rows = [(_name(r.variant), _fmt(r.kl), _with_ci(r.win_rate, r.ci_low, r.ci_high),
                 _with_ci(r.reference_win_rate, r.reference_ci_low, r.reference_ci_high),
                 _with_ci(r.difference, r.difference_ci_low, r.difference_ci_high)) for r in matched]
        parts.append(_table("tbl-matched-kl", ["variant", "KL", f"variant vs {data.baseline}", f"{data.reference_variant} vs {data.baseline}",
                                               "difference"], rows, f"At matched KL, against {data.reference_variant}"))
    else:
        parts.append(_missing("matched-kl", f"No matched-KL comparison: the study has no quality-vs-KL curves for "
                                            f"'{data.reference_variant}' and another variant over a common KL range."))
    end_rows = []
    final = {v: frontier_curve(data.frontier, v)[-1] for v in dict.fromkeys(p.variant for p in data.frontier)}
    for variant in dict.fromkeys([v.name for v in data.variants] + [r.variant for r in data.win_rates]):
        vs_base = next((r for r in data.win_rates if r.variant == variant and r.baseline == data.baseline), None)
        vs_ref = next((r for r in data.win_rates if r.variant == variant and r.baseline == data.reference_variant), None)
        if vs_base is None and vs_ref is None and variant not in final:
            continue
        end_rows.append((_name(variant), _fmt(final[variant].kl) if variant in final else "—",
                         _with_ci(vs_base.win_rate, vs_base.ci_low, vs_base.ci_high) if vs_base else "—",
                         _with_ci(vs_ref.win_rate, vs_ref.ci_low, vs_ref.ci_high) if vs_ref else "—"))
    if end_rows:
        parts.append(_table("tbl-end-of-training", ["variant", "final KL", f"vs {data.baseline}", f"vs {data.reference_variant}"],
                            end_rows, "At the end of training"))
    else:
        parts.append(_missing("end-of-training", "No end-of-training win rates in this study."))
    parts.append("</div>")
    return "".join(parts)


def _section_winrates(data: StudyData, figs: _Figures) -> str:
    head = '<h2 id="sec-winrates">Win rates</h2>'
    if not data.win_rates:
        return head + _missing("winrates", "No win rates in this study.")
    rows = [(_name(r.variant), _name(r.baseline), _with_ci(r.win_rate, r.ci_low, r.ci_high),
             _with_ci(r.lc_win_rate, r.lc_ci_low, r.lc_ci_high), _fmt(r.n), _fmt(r.seeds)) for r in data.win_rates]
    return (head + _table("tbl-winrates", ["variant", "baseline", "win rate [CI]", "length-controlled", "n", "seeds"], rows,
                          "Win rates: mean over seeds, CI over seeds and prompts")
            + figs.html("fig-winrates", figure_winrates(data), "Win rates with CIs; open diamonds are length-controlled."))


def _section_criteria(data: StudyData, figs: _Figures) -> str:
    head = '<h2 id="sec-criteria">Per-criterion win rates</h2>'
    if not data.criteria:
        return head + _missing("criteria", "No per-criterion judge was used in this study.")
    criteria = [c for c in CRITERIA if any(r.criterion == c for r in data.criteria)]
    criteria += sorted({r.criterion for r in data.criteria} - set(criteria))
    rows = []
    for variant in dict.fromkeys(r.variant for r in data.criteria):
        cells = []
        for c in criteria:
            r = next((r for r in data.criteria if r.variant == variant and r.criterion == c), None)
            cells.append(_with_ci(r.win_rate, r.ci_low, r.ci_high) if r else "—")
        rows.append((_name(variant), *cells))
    return (head + _table("tbl-criteria", ["variant", *[c.replace("_", " ") for c in criteria]], rows,
                          f"Win rate vs {data.criteria[0].baseline} per criterion")
            + figs.html("fig-criteria", figure_criteria(data), "Per-criterion win rates with CIs."))


def _section_frontier(data: StudyData, figs: _Figures, matched: list[MatchedKLRow]) -> str:
    head = '<h2 id="sec-frontier">Quality vs KL from the starting model</h2>'
    if not data.frontier:
        return head + _missing("frontier", "No intermediate checkpoints were evaluated, so there is no quality-vs-KL curve.")
    return head + figs.html("fig-frontier", figure_frontier(data, matched),
                            "Win rate vs the sampled KL of each checkpoint's own samples from the starting model.")


def _section_stability(data: StudyData, figs: _Figures) -> str:
    head = '<h2 id="sec-stability">Gradient norm (stability)</h2>'
    if not any(h.values for h in data.grad_norms):
        return head + _missing("stability", "No gradient-norm histories in this study.")
    summary = gradnorm_summary(data)
    rows = [(_name(r["variant"]), _fmt(r["ref_update"]), _fmt(r["alpha"]), _fmt(r["tau"]), _fmt(r["peak"]),
             _fmt(r["peak_max"]), _fmt(r["final"]), _fmt(r["seeds"])) for r in summary]
    out = head + figs.html("fig-gradnorm", figure_gradnorm(data), "Pre-clip gradient norm over steps.")
    if any(r["ref_update"] not in (None, "none") for r in summary):
        out += figs.html("fig-gradnorm-peak", figure_gradnorm_peak(data), "Peak gradient norm against α and τ.")
    else:
        out += _missing("gradnorm-peak", "No variant with a reference update: nothing to plot against α and τ.")
    return out + _table("tbl-gradnorm", ["variant", "update", "α", "τ", "peak (mean)", "peak (max)", "final (mean)", "seeds"],
                        rows, "Gradient norm per variant, over seeds")


def _section_kl(data: StudyData, figs: _Figures) -> str:
    head = '<h2 id="sec-kl">KL to the initial model over training</h2>'
    if not any(h.values for h in data.kl_histories):
        return head + _missing("kl", "No KL-to-initial histories in this study (a training without validation data "
                                     "reports no val/ metrics).")
    return head + figs.html("fig-kl-steps", figure_kl_steps(data), "Validation KL to the initial model over steps.")


def _section_diversity(data: StudyData, figs: _Figures) -> str:
    head = '<h2 id="sec-diversity">Diversity</h2>'
    if not data.diversity:
        return head + _missing("diversity", "No diversity metrics in this study.")
    rows = [(_name(r.variant), _fmt(r.self_bleu, 2), _fmt(r.distinct_1), _fmt(r.distinct_2), _fmt(r.entropy)) for r in data.diversity]
    return (head + _table("tbl-diversity", ["variant", "self-BLEU", "distinct-1", "distinct-2", "entropy"], rows,
                          "Diversity of sampled responses")
            + figs.html("fig-diversity", figure_diversity(data), "Self-BLEU, distinct-n and predictive entropy per variant."))


def _section_sweep(data: StudyData, figs: _Figures) -> str:
    head = '<h2 id="sec-sweep">Sweep over α and τ</h2>'
    if not data.sweep:
        return head + _missing("sweep", "No sweep in this study.")
    out = head
    alphas, taus, _ = _sweep_grid(data.sweep)
    if alphas and taus:
        out += figs.html("fig-sweep-heatmap", figure_sweep_heatmap(data), f"{data.sweep_metric} over α × τ (soft updates).")
    else:
        out += _missing("sweep-heatmap", "No soft-update trials: no α × τ heat map.")
    if any(r.ref_update == "hard" and r.tau is not None for r in data.sweep):
        out += figs.html("fig-sweep-tau", figure_sweep_tau(data), f"{data.sweep_metric} over τ (hard updates).")
    else:
        out += _missing("sweep-tau", "No hard-update trials: no τ curve.")
    ordered = sorted(data.sweep, key=lambda r: r.metric, reverse=data.sweep_mode == "max")
    rows = [(_fmt(r.ref_update), _fmt(r.alpha), _fmt(r.tau), _fmt(r.metric, 4)) for r in ordered]
    return out + _table("tbl-sweep", ["update", "α", "τ", data.sweep_metric], rows, f"Trials, best first ({data.sweep_mode})")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1120px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:1.6em;margin-bottom:4px} h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:12px 0;font-size:0.85em} caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right} th:first-child,td:first-child{text-align:left}
thead{background:#f3f3f3} .ci{color:#666;font-size:0.9em} .pair{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
figure{margin:12px 0} figure img{max-width:100%;height:auto;border:1px solid #eee} figcaption{font-size:0.8em;color:#555}
.missing{color:#8a6d3b;background:#fcf8e3;border:1px solid #faebcc;padding:6px 10px;font-size:0.9em}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:0.9em} dt{font-weight:600}
"""


def build_report(data: StudyData, out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` and its PNG figures; return the HTML's path."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = _Figures(out_dir)
    matched = data.matched_kl if data.matched_kl is not None else matched_kl_table(data.frontier, data.reference_variant)
    summary = "".join(f"<dt>{_name(k)}</dt><dd>{_name(v)}</dd>" for k, v in data.summary.items())
    variants = _table("tbl-variants", ["variant", "reference update", "α", "τ"],
                      [(_name(v.name), _fmt(v.ref_update), _fmt(v.alpha), _fmt(v.tau)) for v in data.variants],
                      "Variants") if data.variants else ""
    notes = "".join(f"<li>{_name(n)}</li>" for n in data.notes)
    body = "".join([
        f"<h1>{_name(data.title)}</h1>",
        f"<dl>{summary}</dl>" if summary else "",
        variants,
        f"<ul class=notes>{notes}</ul>" if notes else "",
        _section_matched(data, matched),
        _section_frontier(data, figs, matched),  # the picture behind the matched-KL table
        _section_winrates(data, figs),
        _section_criteria(data, figs),
        _section_stability(data, figs),
        _section_kl(data, figs),
        _section_diversity(data, figs),
        _section_sweep(data, figs),
    ])
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_name(data.title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- an example study


def example_study(seed: int = 0) -> StudyData:
    """Made-up but realistic data of every kind (DPO, TR-DPO soft and hard, 3 seeds, 4 checkpoints,
    a small sweep): for previews and the report tests. Not a result."""
    import numpy as np

    rng = np.random.default_rng(seed)
    variants = [VariantInfo("dpo", "none"), VariantInfo("trdpo-soft", "soft", 0.6, 8), VariantInfo("trdpo-hard", "hard", None, 32)]
    drift = {"dpo": 1.0, "trdpo-soft": 1.5, "trdpo-hard": 1.3}  # TR-DPO drifts further per step
    steps = [0, 20, 40, 60, 80]
    frontier, grad, kls, rates = [], [], [], []
    for v in variants:
        for seed_ in range(3):
            kl_steps = [drift[v.name] * 0.03 * s * (1 + 0.1 * rng.standard_normal()) for s in steps]
            kls.append(History(v.name, seed_, steps, [max(0.0, k / 20) for k in kl_steps]))
            gn = 2.0 + rng.gamma(2.0, 0.5, size=len(range(0, 81, 4)))
            if v.ref_update != "none":  # spikes after reference updates
                gn[:: max(1, (v.tau or 8) // 4)] *= 1.0 + 0.5 * drift[v.name]
            grad.append(History(v.name, seed_, list(range(0, 81, 4)), [float(x) for x in gn]))
            for s, k in zip(steps[1:], kl_steps[1:]):
                # Quality rises with KL, then falls: over-optimisation past KL ~2.
                w = 0.5 + 0.12 * k - 0.025 * k**2 + 0.02 * rng.standard_normal()
                frontier.append(FrontierPoint(v.name, s, float(k), float(w), seed=seed_))
        for s in steps[1:]:
            pts = [p for p in frontier if p.variant == v.name and p.step == s and p.seed is not None]
            k, w = np.mean([p.kl for p in pts]), np.mean([p.win_rate for p in pts])
            frontier.append(FrontierPoint(v.name, s, float(k), float(w), float(w - 0.06), float(w + 0.06), kl_se=0.05))
        final = [p for p in frontier if p.variant == v.name and p.step == steps[-1] and p.seed is None][0]
        rates.append(WinRateRow(v.name, "sft", final.win_rate, final.ci_low, final.ci_high, 600, final.win_rate - 0.02,
                                final.ci_low - 0.02, final.ci_high - 0.02, seeds=3))
    for v in variants[1:]:
        d = float(rng.normal(0.02, 0.02))
        rates.append(WinRateRow(v.name, "dpo", 0.5 + d, 0.44 + d, 0.56 + d, 600, 0.5 + d / 2, seeds=3))
    criteria = [CriterionRow(v.name, c, float(0.5 + rng.normal(0.06, 0.04)), None, None) for v in variants for c in CRITERIA]
    criteria = [CriterionRow(r.variant, r.criterion, r.win_rate, r.win_rate - 0.07, r.win_rate + 0.07) for r in criteria]
    diversity = [DiversityRow(v.name, float(rng.uniform(20, 40)), float(rng.uniform(0.2, 0.4)), float(rng.uniform(0.5, 0.7)),
                              float(rng.uniform(1.5, 2.5))) for v in variants]
    sweep = [SweepRow("soft", a, t, float(0.55 + 0.1 * a - 0.02 * math.log2(t) + 0.01 * rng.standard_normal()))
             for a in (0.3, 0.5, 0.7) for t in (1, 4, 16, 64)]
    sweep += [SweepRow("hard", None, t, float(0.5 + 0.015 * math.log2(t) + 0.01 * rng.standard_normal())) for t in (16, 64, 256, 512)]
    sweep += [SweepRow("none", None, None, 0.56)]
    return StudyData(
        title="TR-DPO study (example data)", summary={"task": "synthetic (proxy labels)", "seeds": "0, 1, 2", "steps": "80"},
        variants=variants, win_rates=rates, criteria=criteria, frontier=frontier, grad_norms=grad, kl_histories=kls,
        diversity=diversity, sweep=sweep, sweep_metric="eval/win_rate", notes=["Example data, not a result."],
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build a study report from a StudyData JSON file, or from example data.")
    parser.add_argument("out_dir", type=Path)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--study", type=Path, help="StudyData JSON (StudyData.save)")
    source.add_argument("--example", action="store_true", help="made-up data of every kind")
    args = parser.parse_args()
    study = example_study() if args.example else StudyData.load(args.study)
    print(build_report(study, args.out_dir))
