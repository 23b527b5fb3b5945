"""The MLflow UI of the cluster in headless Chromium (Debian's package): the parent run's page lists
its child runs, and a screenshot of the experiment's runs is a real page, not a blank one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str:
    from e2e_cluster import require

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    require("Chromium", "chromium", found is not None)
    return found


def run_chromium(profile: Path, *args: str) -> str:
    result = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def page_text(profile: Path, url: str, budget_ms: int = 30000) -> str:
    """The DOM after the single-page app has rendered (its API calls included)."""
    return run_chromium(profile, f"--virtual-time-budget={budget_ms}", "--dump-dom", url)


def mlflow_ui_shows(cluster, experiment_id: str, parent, children: set[str], tmp_path: Path) -> Path:
    profile = tmp_path / "chromium-profile"
    run_page = f"{cluster.tracking_uri}/#/experiments/{experiment_id}/runs/{parent.info.run_id}"
    dom = page_text(profile, run_page)
    assert parent.info.run_name in dom, dom[-3000:]
    assert "Child runs" in dom
    missing = {name for name in children if name not in dom}
    assert not missing, f"the parent run's page does not list {sorted(missing)}"

    shot = tmp_path / "mlflow-runs.png"
    runs_page = f"{cluster.tracking_uri}/#/experiments/{experiment_id}/runs"
    run_chromium(profile, "--virtual-time-budget=30000", f"--screenshot={shot}", "--window-size=1400,900", runs_page)
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1400)
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, icons, a table: not a blank or error page
    keep = os.environ.get("TRDPO_E2E_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
        run_chromium(profile, "--virtual-time-budget=30000", f"--screenshot={Path(keep) / 'mlflow-parent-run.png'}",
                     "--window-size=1400,1100", run_page)
        (Path(keep) / "mlflow-parent-run.html").write_text(dom)
    return shot
