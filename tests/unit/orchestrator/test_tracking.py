"""Where MLflow keeps things: artifacts beside a SQLite store, runs opened on the runs view."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

from orchestrator.config import TrackingConfig
from orchestrator.tracking import configure_tracking
from mlflow_store import sqlite_store


def test_artifacts_live_beside_the_sqlite_store_wherever_the_command_runs(tmp_path, monkeypatch):
    store = tmp_path / "study" / "mlflow.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    configure_tracking(TrackingConfig(tracking_uri=f"sqlite:///{store}", experiment_name="beside"))
    experiment = mlflow.get_experiment_by_name("beside")
    assert experiment.artifact_location == (store.parent / "mlartifacts").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    with mlflow.start_run() as run:
        (tmp_path / "a.txt").write_text("x")
        mlflow.log_artifact(str(tmp_path / "a.txt"))
    assert (store.parent / "mlartifacts" / run.info.run_id / "artifacts" / "a.txt").exists()
    assert not (elsewhere / "mlruns").exists() and os.listdir(elsewhere) == []
    # Running again from another directory finds the same experiment and the same place.
    monkeypatch.chdir(tmp_path)
    configure_tracking(TrackingConfig(tracking_uri=f"sqlite:///{store}", experiment_name="beside"))
    assert mlflow.get_experiment_by_name("beside").artifact_location == Path(store.parent / "mlartifacts").as_uri()


def test_params_follow_one_rule_the_str_cut_to_mlflows_limit_in_accepted_batches(tmp_path):
    """More params than one batch takes, one value longer than MLflow accepts: all logged, that
    one cut to MAX_PARAM_LENGTH characters, the others exactly their str()."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import MAX_PARAM_LENGTH, PARAMS_PER_BATCH, log_params

    client = MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    run = client.create_run(client.create_experiment("params", artifact_location=str(tmp_path / "artifacts")))
    params = {f"p{i}": i for i in range(PARAMS_PER_BATCH + 5)} | {"long": "x" * (MAX_PARAM_LENGTH + 10), "none": None}
    log_params(params, run.info.run_id, client)
    logged = client.get_run(run.info.run_id).data.params
    assert logged["long"] == "x" * MAX_PARAM_LENGTH and logged["none"] == "None" and logged["p104"] == "104"
    assert len(logged) == len(params)
