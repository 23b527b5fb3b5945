"""The study report: matched-KL interpolation by hand, sections, embedded figures, JSON round trip."""

import base64
import math
from html.parser import HTMLParser

import pytest

from study_example import example_study

from evaluation.paired import interpolation_weights
from orchestrator.study.data import FrontierPoint, History, StudyData, SweepRow, VariantInfo
from orchestrator.study.report import build_report
from orchestrator.study.stats import frontier_curve, gradnorm_summary, interpolate_at, matched_kl_table

FIGURES = ["fig-frontier", "fig-winrates", "fig-criteria", "fig-gradnorm", "fig-gradnorm-peak", "fig-kl-steps",
           "fig-diversity", "fig-sweep-heatmap", "fig-sweep-tau"]
TABLES = ["tbl-matched-kl", "tbl-end-of-training", "tbl-winrates", "tbl-criteria", "tbl-gradnorm", "tbl-diversity",
          "tbl-sweep", "tbl-variants"]
SECTIONS = ["matched-kl", "end-of-training", "frontier", "winrates", "criteria", "stability", "kl", "diversity", "sweep"]


class Elements(HTMLParser):
    """Every element's tag and attributes, in document order."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def ids(self, tag: str) -> list[str]:
        return [a.get("id") for t, a in self.elements if t == tag and a.get("id")]


def test_interpolation_by_hand():
    """xs (3, 0, 1) -> ys (0.8, 0.5, 0.6), unsorted. At 2: halfway between (1, 0.6) and (3, 0.8) = 0.7."""
    xs, ys = [3.0, 0.0, 1.0], [0.8, 0.5, 0.6]
    assert interpolate_at(xs, ys, 2.0) == pytest.approx(0.7)
    assert interpolate_at(xs, ys, 0.0) == pytest.approx(0.5) and interpolate_at(xs, ys, 3.0) == pytest.approx(0.8)
    assert math.isnan(interpolate_at(xs, ys, 3.5)) and math.isnan(interpolate_at(xs, ys, -0.1))  # no extrapolation
    # Equal x values are averaged: at 1.5, 0.5 * mean(0.4, 0.6) + 0.5 * 1.0 = 0.75.
    assert interpolation_weights([1.0, 1.0, 2.0], 1.5) == [(0, 0.25), (1, 0.25), (2, 0.5)]
    assert interpolate_at([1.0, 1.0, 2.0], [0.4, 0.6, 1.0], 1.5) == pytest.approx(0.75)
    assert interpolation_weights([2.0], 2.0) == [(0, 1.0)] and interpolation_weights([], 1.0) == []


def _curve(variant, kls, wins, lows, highs):
    return [FrontierPoint(variant, 10 * (i + 1), k, w, lo, hi) for i, (k, w, lo, hi) in enumerate(zip(kls, wins, lows, highs))]


def test_matched_kl_table_by_hand():
    """TR-DPO reaches KL 0.5..4, DPO 0.4..3: common range [0.5, 3], levels 1.75 (midpoint) and 3 (top).
    TR at 1.75: a = 0.75 between (1, .60) and (2, .70) -> .675; CI .54 + .75*.08 = .60, .66 + .75*.12 = .75.
    DPO at 1.75: a = .25/1.5 = 1/6 between (1.5, .62) and (3, .66) -> .62667; CI .56333, .69.
    TR at 3: halfway between (2, .70) and (4, .75) -> .725 [.635, .815]; DPO at 3: .66 [.58, .74]."""
    frontier = (_curve("trdpo", [0.5, 1, 2, 4], [.55, .6, .7, .75], [.50, .54, .62, .65], [.60, .66, .78, .85])
                + _curve("dpo", [0.4, 1.5, 3], [.52, .62, .66], [.47, .56, .58], [.57, .68, .74]))
    rows = matched_kl_table(frontier, "dpo")
    assert [r.kl for r in rows] == [1.75, 3.0]
    first, top = rows
    assert (first.win_rate, first.ci_low, first.ci_high) == pytest.approx((0.675, 0.60, 0.75))
    assert (first.reference_win_rate, first.reference_ci_low, first.reference_ci_high) == pytest.approx((0.62 + 0.04 / 6, 0.56 + 0.02 / 6, 0.69))
    assert first.difference == pytest.approx(0.675 - (0.62 + 0.04 / 6))
    assert (top.win_rate, top.ci_low, top.ci_high, top.reference_win_rate) == pytest.approx((0.725, 0.635, 0.815, 0.66))
    assert top.difference_ci_low is None  # needs paired judgments; never invented here
    # Explicit levels; one outside DPO's range gives no row.
    assert [r.kl for r in matched_kl_table(frontier, "dpo", kl_levels=[1.0, 3.5])] == [1.0]
    # Ranges that do not overlap: no row at all.
    assert matched_kl_table(_curve("a", [5, 6], [.6, .7], [.5, .6], [.7, .8]) + _curve("dpo", [1, 2], [.5, .6], [.4, .5], [.6, .7]), "dpo") == []


def test_curve_from_per_seed_points_is_their_mean_per_step():
    points = [FrontierPoint("v", 10, 1.0, 0.6, seed=0), FrontierPoint("v", 10, 3.0, 0.7, seed=1),
              FrontierPoint("v", 20, 4.0, 0.8, seed=0)]
    curve = frontier_curve(points, "v")
    assert [(p.step, p.kl, p.win_rate, p.ci_low) for p in curve] == [(10, 2.0, pytest.approx(0.65), None), (20, 4.0, 0.8, None)]
    # An across-seed point, where given, is used instead of the per-seed ones.
    assert [p.kl for p in frontier_curve(points + [FrontierPoint("v", 10, 9.0, 0.5, 0.4, 0.6)], "v")] == [9.0]


def test_gradnorm_summary_by_hand():
    """Seeds peak at 3 and 5 -> mean peak 4, max 5; finals 1 and 2 -> 1.5."""
    data = StudyData(variants=[VariantInfo("soft", "soft", 0.6, 8)],
                     grad_norms=[History("soft", 0, [0, 1, 2], [1.0, 3.0, 1.0]), History("soft", 1, [0, 1, 2], [5.0, 2.0, 2.0])])
    assert gradnorm_summary(data) == [{"variant": "soft", "ref_update": "soft", "alpha": 0.6, "tau": 8, "peak": 4.0,
                                       "peak_max": 5.0, "final": 1.5, "seeds": 2}]


def test_full_report_embeds_every_figure_as_the_png_beside_it(tmp_path):
    path = build_report(example_study(), tmp_path)
    text = path.read_text()
    doc = Elements(text)
    assert doc.ids("figure") == FIGURES
    assert set(doc.ids("table")) == set(TABLES)
    # The matched-KL comparison comes first.
    assert text.index('id="tbl-matched-kl"') < min(text.index(f'id="{t}"') for t in TABLES if t not in ("tbl-matched-kl", "tbl-variants"))
    images = [a["src"] for t, a in doc.elements if t == "img"]
    assert len(images) == len(FIGURES)
    for fig_id, src in zip(FIGURES, images):
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == (tmp_path / f"{fig_id}.png").read_bytes()
    assert 'class="missing"' not in text  # no notes when every kind of data is there
    # Self-contained: no scripts, no stylesheets or images fetched from elsewhere.
    assert "<script" not in text and "<link" not in text and "http://" not in text and "https://" not in text


def test_empty_study_omits_every_section_with_a_note(tmp_path):
    text = build_report(StudyData(title="nothing yet"), tmp_path).read_text()
    doc = Elements(text)
    assert [a["id"] for t, a in doc.elements if t == "p" and a.get("class") == "missing"] == [f"missing-{s}" for s in SECTIONS]
    assert "<img" not in text and not list(tmp_path.glob("*.png"))


def test_partial_sweep_and_no_reference_updates(tmp_path):
    data = StudyData(sweep=[SweepRow("hard", None, 64, 0.6), SweepRow("hard", None, 256, 0.62), SweepRow("none", None, None, 0.55)],
                     variants=[VariantInfo("dpo", "none")], grad_norms=[History("dpo", 0, [0, 1], [2.0, 3.0])])
    doc = Elements(build_report(data, tmp_path).read_text())
    assert doc.ids("figure") == ["fig-gradnorm", "fig-sweep-tau"]
    missing = [a["id"] for t, a in doc.elements if t == "p" and a.get("class") == "missing"]
    assert "missing-sweep-heatmap" in missing and "missing-gradnorm-peak" in missing


def test_names_are_escaped(tmp_path):
    data = example_study()
    data.title = "<b>x</b> & y"
    data.win_rates[0].variant = "<script>"
    text = build_report(data, tmp_path).read_text()
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt; &amp; y" in text and "<script>" not in text


def test_study_data_round_trips_through_json(tmp_path):
    data = example_study(seed=3)
    loaded = StudyData.load(data.save(tmp_path / "study.json"))
    assert loaded == data and loaded.matched_kl is None
    with pytest.raises(ValueError, match="unknown StudyData fields: \\['bogus'\\]"):
        StudyData.from_dict({"bogus": 1})


def test_a_final_policy_of_unknown_step_is_the_last_point_not_step_0(tmp_path):
    """A run trained by epochs has no max_steps: its final policy was drawn as step 0, first on
    its curve (the line then ran back from the end to the start)."""
    from orchestrator.study.collect import _step_number

    assert _step_number("final", [], "v", []) is None
    assert _step_number("final", [], "v", [History("v", 0, [1, 2, 3], [0.1, 0.2, 0.3])]) == 3
    points = [FrontierPoint("v", None, 3.0, 0.7), FrontierPoint("v", 10, 1.0, 0.6, 0.5, 0.7)]
    assert [p.step for p in frontier_curve(points, "v")] == [10, None]
    html = build_report(StudyData(frontier=points), tmp_path).read_text()
    assert 'id="fig-frontier"' in html


def test_an_unknown_interval_draws_no_error_bar():
    from orchestrator.study.figures import _err

    assert _err(0.6, None, None) is None and _err(0.6, float("nan"), 0.7) is None
    assert _err(0.6, 0.5, 0.8) == [[pytest.approx(0.1)], [pytest.approx(0.2)]]
