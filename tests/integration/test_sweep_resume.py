"""Ctrl-C a running sweep, then `trdpo sweep --resume`: every trial ends exactly once, finished
trials are not rerun, and unfinished ones continue from their checkpoints (no step trained twice
from scratch). Runs the real CLI in subprocesses, each with its own local Ray."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

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


def test_interrupted_sweep_resumes_without_retraining(tmp_path):
    tree = yaml.safe_load((FIXTURES / "sweep_tiny.yaml").read_text())
    # The fixture checkpoints every 4 of 16 steps: an interrupt mid-trial resumes from step 4, 8 or 12.
    tree["scheduler"]["type"] = "none"  # every trial runs to the end: the interrupt lands mid-trial
    tree["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "output_dir": str(tmp_path / "runs"), "experiment_name": "tests"}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(path)]

    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while finished_trials(tmp_path / "mlflow.db") < 1 and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert first.poll() is None, first.communicate()[0][-3000:]
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=180)[0]
    assert first.returncode != 0, output[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tests")
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("trdpo.kind") == "sweep")
    assert parent.info.status == "KILLED"
    before = {r.data.tags["trdpo.trial_id"]: r for r in client.search_runs([experiment.experiment_id], "tags.trdpo.trial_id != ''")}
    assert not [r for r in before.values() if r.info.status == "RUNNING"]
    done_before = {t: r for t, r in before.items() if r.data.tags.get("trdpo.trial_status") == "completed"}
    assert done_before, output[-3000:]
    histories_before = {t: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss")] for t, r in done_before.items()}

    resumed = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    after = client.search_runs([experiment.experiment_id], "tags.trdpo.trial_id != ''")
    assert len(after) == 4 and len({r.data.tags["trdpo.trial_id"] for r in after}) == 4  # each trial exactly once
    assert all(r.info.status == "FINISHED" and r.data.tags["trdpo.trial_status"] == "completed" for r in after)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    for run in after:
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert [s for s, _ in history].count(1) == 1, f"trial {run.data.tags['trdpo.trial_id']} trained from scratch twice"
        assert max(s for s, _ in history) == 16
        trial = run.data.tags["trdpo.trial_id"]
        if trial in histories_before:  # finished before the interrupt: not touched again
            assert history == histories_before[trial]
