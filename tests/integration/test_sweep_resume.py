"""Ctrl-C a running sweep, then `trdpo sweep --resume`: every trial ends exactly once, finished
trials are not rerun, and a trial cut short after a checkpoint continues from it (it is not
trained again from step 0). Runs the real CLI in subprocesses, each with its own local Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow_store import sqlite_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def finished_trials(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from tags where key = 'trdpo.trial_status'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def checkpointed_unfinished_trials(runs: Path) -> set[str]:
    """Trials with a complete checkpoint (rank 0 writes its record last) and no exported policy yet."""
    trials = runs / "sweeps" / "tiny" / "trials"
    return {t.name for t in trials.glob("*") if list(t.glob("checkpoints/attempt-*/step_*/trdpo_checkpoint.json"))
            and not (t / "policy" / "config.json").exists()}


def reported_steps(runs: Path) -> dict[str, list[int]]:
    """Each trial's steps in the order Tune recorded them, across both invocations."""
    steps = {}
    for result in (runs / "sweeps" / "tiny" / "tune" / "tiny").glob("run_trial_*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            steps[rows[0]["trial_id"]] = [row["step"] for row in rows]
    return steps


MAX_STEPS = 48


def test_interrupted_sweep_resumes_without_retraining(tmp_path):
    tree = yaml.safe_load((FIXTURES / "sweep_tiny.yaml").read_text())
    # Checkpoints every 4 of MAX_STEPS steps: an interrupt mid-trial resumes from a multiple of 4, up to
    # MAX_STEPS (stored, its report not yet seen by Tune: nothing left to train, the policy still to
    # export). The fixture's 16 steps take about a second: too short a window to interrupt in reliably.
    tree["overrides"].append(f"training.max_steps={MAX_STEPS}")
    tree["scheduler"]["type"] = "none"  # every trial runs to the end: the interrupt lands mid-trial
    tree["search"]["variants"][1]["training.tau"] = 8  # 3 trials: 2 soft, 1 hard
    tree["tracking"] = {"tracking_uri": sqlite_store(tmp_path / "mlflow.db"), "output_dir": str(tmp_path / "runs"), "experiment_name": "tests"}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(path)]

    # Interrupt once one trial has finished and another is past a checkpoint but not done.
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if this runs with it ignored
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not (
                finished_trials(tmp_path / "mlflow.db") >= 1 and checkpointed_unfinished_trials(tmp_path / "runs")):
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[0][-3000:]
        first.send_signal(signal.SIGINT)
        output = first.communicate(timeout=180)[0]
    finally:
        if first.poll() is None:  # failed on the way: stop the sweep and its Ray, not leave them running
            first.terminate()
            first.wait(timeout=60)
    assert first.returncode != 0, output[-3000:]
    # A trial can still finish between the last look and the interrupt: only the ones left count.
    cut_short = checkpointed_unfinished_trials(tmp_path / "runs")
    assert cut_short, "the interrupt landed after every checkpointed trial finished"

    client = MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    experiment = client.get_experiment_by_name("tests")
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("trdpo.kind") == "sweep")
    assert parent.info.status == "KILLED"
    before = {r.data.tags["trdpo.trial_id"]: r for r in client.search_runs([experiment.experiment_id], "tags.trdpo.trial_id != ''")}
    assert not [r for r in before.values() if r.info.status == "RUNNING"]
    done_before = {t: r for t, r in before.items() if r.data.tags.get("trdpo.trial_status") == "completed"}
    assert done_before, output[-3000:]
    histories_before = {t: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss")] for t, r in done_before.items()}

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text[-3000:]
    after = client.search_runs([experiment.experiment_id], "tags.trdpo.trial_id != ''")
    assert len(after) == 3 and len({r.data.tags["trdpo.trial_id"] for r in after}) == 3  # each trial exactly once
    assert all(r.info.status == "FINISHED" and r.data.tags["trdpo.trial_status"] == "completed" for r in after)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    for run in after:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)) and max(steps) == MAX_STEPS  # one value per step, to the end
        trial = run.data.tags["trdpo.trial_id"]
        if trial in histories_before:  # finished before the interrupt: not touched again
            assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == histories_before[trial]
    for trial in cut_short:  # continued from its own checkpoint, not from step 0
        resumed_from = re.findall(rf"resuming from \S*trials/{trial}/checkpoints/\S+ \(step (\d+)\)", text)
        assert resumed_from and int(resumed_from[0]) % 4 == 0 and 4 <= int(resumed_from[0]) <= MAX_STEPS, text[-3000:]
    for trial, steps in reported_steps(tmp_path / "runs").items():  # no step reported twice to Tune
        assert steps == sorted(set(steps)) and steps[-1] == MAX_STEPS, (trial, steps)
