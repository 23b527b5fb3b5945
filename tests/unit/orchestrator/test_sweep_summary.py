"""How the sweep closes its trials' MLflow runs (orchestrator.sweep.summary.summarize), on a real MLflow
store, without Ray: Tune's view of a trial can lag behind what the trial itself finished."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.sweep.config import load_sweep
from orchestrator.sweep.ledger import TrialLedger
from orchestrator.sweep.summary import summarize
from orchestrator.sweep.trial import STATUS_TAG, TRIAL_TAG
from trainers.state.storage import Storage
from mlflow_store import sqlite_store

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_a_trial_that_trained_to_the_end_is_completed_even_if_tune_last_heard_of_an_earlier_step(tmp_path):
    """A checkpoint is stored before its report reaches Tune: a sweep interrupted in between
    resumes that trial at its last step, where nothing is left to train or report, so Tune's last
    step stays 12 of 16. The trial function's own "completed" decides; an ASHA stop stays a stop."""
    loaded = load_sweep(FIXTURES / "sweep_tiny.yaml")  # 16 steps per trial
    client = MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    experiment = client.create_experiment("tests")
    parent = client.create_run(experiment).info.run_id

    def child(trial_id: str, status: str | None) -> str:
        tags = {"mlflow.parentRunId": parent, TRIAL_TAG: trial_id, **({STATUS_TAG: status} if status else {})}
        return client.create_run(experiment, tags=tags).info.run_id

    runs = {"resumed-at-end": child("resumed-at-end", "completed"), "stopped": child("stopped", None),
            "cut-short": child("cut-short", None)}
    ledger = TrialLedger(Storage(str(tmp_path / "sweep")))
    ledger.trials = {"resumed-at-end": {"config": {"point": 0}, "state": "ended", "step": 12},
                     "stopped": {"config": {"point": 2}, "state": "ended", "step": 4},
                     "cut-short": {"config": {"point": 1}, "state": "running", "step": 8}}
    rows = {row.trial_id: row for row in summarize([], ledger, loaded, client, parent)}
    assert (rows["resumed-at-end"].status, rows["resumed-at-end"].steps) == ("completed", 16)
    assert (rows["stopped"].status, rows["stopped"].steps) == ("stopped early at step 4", 4)
    assert rows["cut-short"].status == "interrupted"
    statuses = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert statuses == {"resumed-at-end": "FINISHED", "stopped": "FINISHED", "cut-short": "KILLED"}
    assert client.get_run(runs["resumed-at-end"]).data.tags[STATUS_TAG] == "completed"
