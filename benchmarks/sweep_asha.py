"""ASHA vs the full grid on the same smoke sweep: wall time ratio, and whether both pick the same
best configuration. One run each, in this order, each with its own local Ray (2 CPUs here).

    python benchmarks/sweep_asha.py [--sweep tune_configs/smoke.yaml]
    python benchmarks/sweep_asha.py --quick    # 1 tiny trial of 4 steps per scheduler: checks the script, measures nothing

Target: ASHA <= 0.35x the full grid's wall time with the same winner (issue 18; 0.5x before).
Also printed: each trial's start-up, from its MLflow child run's creation (inside the trial
function, after the trial actor's own start and imports: see benchmarks/startup.py) to its first
logged step, median over the trials (target <= 10 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]

# --quick: the smallest sweep that goes through every part of the script: one trial of 4 steps
# with one ASHA rung at step 2 (ASHA has nothing to stop; the ratio is ~1 and means nothing).
QUICK_SWEEP = {
    "name": "quick",
    "base": "default",
    "overrides": ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_heads=2",
                  "data.synthetic.num_pairs=64", "data.max_length=64", "training.per_device_batch_size=4",
                  "training.max_steps=4", "training.tau=2", "training.eval_every=2", "training.checkpoint_every=4",
                  "training.warmup_steps=0", "training.lr_scheduler=constant", "training.log_every=2"],
    "search": {"variants": [{"training.ref_update": "soft", "training.alpha": 0.6, "training.tau": 2,
                             "training.learning_rate": {"grid": [3.0e-3]}}]},
    "scheduler": {"type": "asha", "metric": "val/rewards/accuracy", "mode": "max", "grace_period": 2,
                  "reduction_factor": 2, "max_t": 4},
    "max_concurrent_trials": 1,
}


def run(sweep: Path | None, scheduler: str, tmp: Path) -> tuple[float, str, str, list[float]]:
    if sweep is None:
        tree = yaml.safe_load(yaml.safe_dump(QUICK_SWEEP))  # a deep copy
    else:
        tree = yaml.safe_load(sweep.read_text())
        if tree.get("base", "default") != "default":
            tree["base"] = str((sweep.parent / tree["base"]).resolve())
    tree["scheduler"]["type"] = scheduler
    tree["tracking"] = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "output_dir": str(tmp / "runs"), "experiment_name": "bench"}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    start = time.perf_counter()
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(path)], cwd=tmp, capture_output=True, text=True,
                          env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "PYTHONPATH": pythonpath})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{scheduler} sweep failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("bench").experiment_id]) if r.data.tags.get("trdpo.kind") == "sweep")
    trials = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stopped = sum(1 for r in trials if r.data.tags.get("trdpo.trial_status", "").startswith("stopped"))
    startup = []
    for trial in trials:  # child run created -> its first logged step
        steps = client.get_metric_history(trial.info.run_id, "train/loss")
        if steps:
            startup.append((min(m.timestamp for m in steps) - trial.info.start_time) / 1000)
    return seconds, parent.data.tags.get("trdpo.best_values", "?"), f"{stopped} stopped early", startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=REPO / "tune_configs" / "smoke.yaml")
    parser.add_argument("--quick", action="store_true", help="1 tiny trial of 4 steps instead of --sweep: checks the script.")
    args = parser.parse_args()
    if args.quick:
        print("QUICK (checks the script; numbers mean nothing): 1 trial x 4 steps, one ASHA rung at step 2", flush=True)
    def timed(scheduler: str) -> tuple[float, str, str, list[float]]:
        with tempfile.TemporaryDirectory(prefix="trdpo-bench-") as tmp:
            return run(None if args.quick else args.sweep.resolve(), scheduler, Path(tmp))

    # Measured one after the other; --quick runs both at once (its times mean nothing anyway).
    with ThreadPoolExecutor(max_workers=2 if args.quick else 1) as pool:
        results = dict(zip(("asha", "none"), pool.map(timed, ("asha", "none"))))
    for scheduler, (seconds, winner, note, startup) in results.items():
        print(f"{scheduler:>5}: {seconds:6.1f} s, {note}, best {winner}; trial start -> first step "
              f"{statistics.median(startup):.1f} s (median of {len(startup)})", flush=True)
    ratio = results["asha"][0] / results["none"][0]
    same = results["asha"][1] == results["none"][1]
    print(f"ASHA/full-grid wall time {ratio:.2f}x (target <= 0.35); same winner: {same}")
    every = results["asha"][3] + results["none"][3]
    print(f"trial start -> first step {statistics.median(every):.1f} s, median of {len(every)} trials (target <= 10 s)")


if __name__ == "__main__":
    main()
