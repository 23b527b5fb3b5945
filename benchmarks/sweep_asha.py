"""ASHA vs the full grid on the same smoke sweep: wall time ratio, and whether both pick the same
best configuration. One run each, in this order, each with its own local Ray (2 CPUs here).

    python benchmarks/sweep_asha.py [--sweep tune_configs/smoke.yaml]

Target: ASHA <= 0.5x the full grid's wall time with the same winner.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def run(sweep: Path, scheduler: str, tmp: Path) -> tuple[float, str, str]:
    tree = yaml.safe_load(sweep.read_text())
    if tree.get("base", "default") != "default":
        tree["base"] = str((sweep.parent / tree["base"]).resolve())
    tree["scheduler"]["type"] = scheduler
    tree["tracking"] = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "output_dir": str(tmp / "runs"), "experiment_name": "bench"}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(path)], check=True, cwd=tmp, capture_output=True,
                   env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"})
    seconds = time.perf_counter() - start
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("bench").experiment_id]) if r.data.tags.get("trdpo.kind") == "sweep")
    stopped = sum(1 for r in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
                  if r.data.tags.get("trdpo.trial_status", "").startswith("stopped"))
    return seconds, parent.data.tags.get("trdpo.best_values", "?"), f"{stopped} stopped early"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=REPO / "tune_configs" / "smoke.yaml")
    args = parser.parse_args()
    results = {}
    for scheduler in ("asha", "none"):
        with tempfile.TemporaryDirectory() as tmp:
            results[scheduler] = run(args.sweep.resolve(), scheduler, Path(tmp))
        seconds, winner, note = results[scheduler]
        print(f"{scheduler:>5}: {seconds:6.1f} s, {note}, best {winner}", flush=True)
    ratio = results["asha"][0] / results["none"][0]
    same = results["asha"][1] == results["none"][1]
    print(f"ASHA/full-grid wall time {ratio:.2f} (target <= 0.5); same winner: {same}")


if __name__ == "__main__":
    main()
