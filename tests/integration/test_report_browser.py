"""The study report in a real browser: headless Chromium (Debian's package) loads the single HTML
file, every figure and table is in the DOM, every image decodes, and a screenshot is taken.

Runs Chromium twice (~10-30 s on 2 CPUs). Skipped where no chromium is installed, unless
TRDPO_REQUIRE_BROWSER is set (CI sets it after installing the package, see .ci/run)."""

from __future__ import annotations

import base64
import os
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from study_example import example_study

from orchestrator.study.report import build_report

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # runs Chromium

FIGURES = ["fig-frontier", "fig-winrates", "fig-criteria", "fig-gradnorm", "fig-gradnorm-peak", "fig-kl-steps",
           "fig-diversity", "fig-sweep-heatmap", "fig-sweep-tau"]
TABLES = ["tbl-variants", "tbl-matched-kl", "tbl-end-of-training", "tbl-winrates", "tbl-criteria", "tbl-gradnorm",
          "tbl-diversity", "tbl-sweep"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Records, after the page has loaded, the pixel width the browser decoded for each image.
PROBE = ('<script>window.addEventListener("load", () => { for (const img of document.images) '
         'img.setAttribute("data-decoded-width", String(img.naturalWidth)); '
         'document.body.setAttribute("data-probe", "done"); });</script>')


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("TRDPO_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


def _run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    result = subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


class _Dom(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))


def test_report_opens_in_chromium_with_every_figure_and_table(tmp_path):
    html_path = build_report(example_study(), tmp_path / "report")
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
    dom_text = _run_chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout
    dom = _Dom(dom_text)

    assert any(t == "body" and a.get("data-probe") == "done" for t, a in dom.elements), "the load event never ran"
    assert [a["id"] for t, a in dom.elements if t == "figure"] == FIGURES
    assert [a["id"] for t, a in dom.elements if t == "table"] == TABLES
    images = [a for t, a in dom.elements if t == "img"]
    assert len(images) == len(FIGURES)
    for img in images:
        assert img["src"].startswith("data:image/png;base64,")
        width, height = _png_size(base64.b64decode(img["src"].split(",", 1)[1], validate=True))
        # The browser decoded the embedded PNG to its real size (0 would mean a broken image).
        assert int(img["data-decoded-width"]) == width and width > 300 and height > 150

    # The report itself, without the probe, as a reader sees it.
    shot = tmp_path / "report.png"
    _run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", "--hide-scrollbars", html_path.as_uri())
    png = shot.read_bytes()
    assert _png_size(png) == (1200, 3000) and len(png) > 50_000

    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(shot)[..., :3]
    # Not a blank or single-colour page: text, tables and plots give many colours and dark pixels.
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 500
    assert 0.01 < (pixels.mean(-1) < 0.5).mean() < 0.5
