"""One self-contained HTML report per study: tables, figures, and the matched-KL comparison first.

Input is a plain :class:`~orchestrator.study.data.StudyData` (from MLflow:
:func:`orchestrator.study.collect.collect_study`; made-up example data for previews:
``python tests/study_example.py OUT_DIR``). :func:`build_report` writes ``report.html``
and one PNG per figure beside it; each PNG is also embedded as a base64 data URI, so the HTML
alone shows everything (no scripts, no external CSS, fonts or images). A section without data is
replaced by a one-line note (``<p class="missing" id="missing-…">``), never a broken image.
Stable ids: figures ``fig-frontier``, ``fig-winrates``, ``fig-criteria``, ``fig-gradnorm``,
``fig-gradnorm-peak``, ``fig-kl-steps``, ``fig-diversity``, ``fig-sweep-heatmap``, ``fig-sweep-tau``;
tables ``tbl-matched-kl``, ``tbl-end-of-training``, ``tbl-winrates``, ``tbl-criteria``,
``tbl-gradnorm``, ``tbl-diversity``, ``tbl-sweep``, ``tbl-variants``.

The statistics are in :mod:`orchestrator.study.stats`, the figures in :mod:`orchestrator.study.figures`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Iterable, Sequence

from orchestrator.study.data import MatchedKLRow, StudyData
from orchestrator.study.figures import (figure_criteria, figure_diversity, figure_frontier, figure_gradnorm,
                                        figure_gradnorm_peak, figure_kl_steps, figure_sweep_heatmap, figure_sweep_tau,
                                        figure_winrates)
from orchestrator.study.stats import criteria_order, frontier_curve, gradnorm_summary, matched_kl_table, sweep_grid

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
    criteria = criteria_order(data.criteria)
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
    alphas, taus, _ = sweep_grid(data.sweep)
    if alphas and taus:
        heatmap = figure_sweep_heatmap(data.sweep, data.sweep_metric, data.sweep_mode)
        out += figs.html("fig-sweep-heatmap", heatmap, f"{data.sweep_metric} over α × τ (soft updates).")
    else:
        out += _missing("sweep-heatmap", "No soft-update trials: no α × τ heat map.")
    if any(r.ref_update == "hard" and r.tau is not None for r in data.sweep):
        curve = figure_sweep_tau(data.sweep, data.sweep_metric)
        out += figs.html("fig-sweep-tau", curve, f"{data.sweep_metric} over τ (hard updates).")
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
