"""Every figure of a study, drawn once: the report embeds them, and a sweep logs its α × τ heat
map and hard-update τ curve from the same functions (:func:`figure_sweep_heatmap`,
:func:`figure_sweep_tau`), so the two never disagree.

Figures are bare matplotlib ``Figure`` objects (no pyplot): no global state, nothing left open."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

from orchestrator.study.data import History, MatchedKLRow, StudyData, SweepRow
from orchestrator.study.stats import criteria_order, frontier_curve, gradnorm_summary, sweep_grid

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
    criteria = criteria_order(data.criteria)
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


def _figure_histories(data: StudyData, histories: Sequence[History], ylabel: str, title: str):
    colors, fig = _colors(data), _new_figure()
    ax = fig.add_subplot()
    _draw_histories(ax, histories, colors)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return fig


def figure_gradnorm(data: StudyData):
    return _figure_histories(data, data.grad_norms, "gradient norm (pre-clip)", "Gradient norm per variant (one line per seed)")




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
    return _figure_histories(data, data.kl_histories, "KL to the initial model (per token)",
                             "KL to the initial model over training (one line per seed)")


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


def figure_sweep_heatmap(rows: Sequence[SweepRow], metric: str, mode: str):
    """The metric over α × τ for soft updates, the mean over each cell's trials; the colour map
    runs so that the better end (``mode``: max or min) is always the bright one."""
    import numpy as np

    alphas, taus, grid = sweep_grid(rows)
    fig = _new_figure(1.6 + 0.9 * len(taus), 1.2 + 0.55 * len(alphas))
    ax = fig.add_subplot()
    values = np.array(grid, dtype=float)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis_r" if mode == "min" else "viridis", aspect="auto")
    for i in range(len(alphas)):
        for j in range(len(taus)):
            if not math.isnan(values[i, j]):
                # Dark text on the bright end of the colour map, white on the dark end.
                bright = float(image.norm(values[i, j])) > 0.6 if mode == "max" else float(image.norm(values[i, j])) < 0.4
                ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=7, color="k" if bright else "w")
    ax.set_xticks(range(len(taus)), [str(t) for t in taus])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("τ")
    ax.set_ylabel("α (soft update)")
    fig.colorbar(image, ax=ax, label=metric)
    return fig


def figure_sweep_tau(rows: Sequence[SweepRow], metric: str):
    """The metric over τ for hard updates (the mean over each τ's trials), no-update runs as a line."""
    fig = _new_figure(6.0, 3.4)
    ax = fig.add_subplot()
    hard = sorted((r for r in rows if r.ref_update == "hard" and r.tau is not None), key=lambda r: r.tau)
    by_tau: dict[int, list[float]] = defaultdict(list)
    for r in hard:
        by_tau[r.tau].append(r.metric)
    ax.plot(list(by_tau), [sum(v) / len(v) for v in by_tau.values()], "-s", label="hard update")
    none = [r.metric for r in rows if r.ref_update == "none"]
    if none:
        ax.axhline(sum(none) / len(none), color="0.4", ls="--", label="no update (DPO)")
    _log2_ticks(ax, list(by_tau))
    ax.set_xlabel("τ (steps between hard updates)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    return fig
