"""Sweeps on Ray Tune + ASHA (real local Ray, 2 CPUs): early stopping, MLflow structure, resources."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.config import load_experiment
from orchestrator.sweep.driver import run_sweep
from mlflow_store import sqlite_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def sweep_file(tmp_path, **extra) -> Path:
    tree = yaml.safe_load((FIXTURES / "sweep_tiny.yaml").read_text())
    tree["tracking"] = {"tracking_uri": sqlite_store(tmp_path / "mlflow.db"), "output_dir": str(tmp_path / "runs"), "experiment_name": "tests"}
    tree.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_asha_stops_losers_and_mlflow_holds_the_study(bystander_ray, ray_2_cpus, tmp_path):
    """Beside another Ray instance on the machine (whose presence once killed Train's
    placement-group cleaner and hung the sweep)."""
    rows, parent_id = run_sweep(sweep_file(tmp_path))
    assert len(rows) == 4
    by_lr = {}
    for row in rows:
        by_lr.setdefault(row.values["training.learning_rate"], []).append(row)
    # The trials that cannot learn are stopped at the first rung (step 4 of 16); a learner finishes.
    assert [(r.status, r.steps) for r in by_lr[1e-12]] == [("stopped early at step 4", 4)] * 2
    assert any(r.status == "completed" and r.steps == 16 for r in by_lr[3e-3])
    # A trial that ran to the end exported its policy (an ASHA stop at its last report once ended
    # it inside that report, before the export) and tagged itself completed.
    trials = tmp_path / "runs" / "sweeps" / "tiny" / "trials"
    for row in rows:
        assert (trials / row.trial_id / "policy" / "config.json").exists() == (row.status == "completed"), row
    assert all(r.best is not None for r in rows)

    client = MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["trdpo.kind"] == "sweep"
    artifacts = {a.path for folder in (None, "plots", "sweep") for a in client.list_artifacts(parent_id, folder)}
    assert {"results.csv", "best_config.yaml", "plots/heatmap_alpha_tau.png", "plots/curve_hard_tau.png", "sweep/sweep.yaml"} <= artifacts
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 4 and len({c.data.tags["trdpo.trial_id"] for c in children}) == 4
    assert all(c.info.status == "FINISHED" and c.data.tags["trdpo.trial_status"] for c in children)
    stopped = [c for c in children if c.data.tags["trdpo.trial_status"].startswith("stopped early")]
    assert len(stopped) >= 2
    # The winner is a ready-to-run experiment.
    best = Path(client.download_artifacts(parent_id, "best_config.yaml", str(tmp_path)))
    config = load_experiment(best)
    assert config.training.learning_rate == 3e-3 and config.training.ref_update == "soft"
    # 1-worker trials train in their trial process, which Tune hands on to the next trial: four
    # trials, two at a time, in at most two processes (each with its imports already done).
    results = (tmp_path / "runs" / "sweeps" / "tiny" / "tune" / "tiny").glob("*/result.json")
    pids = {json.loads(line)["pid"] for result in results for line in result.read_text().splitlines() if line.strip()}
    assert 1 <= len(pids) <= 2, pids
    # Every worker and trial released its CPUs (the placement-group cleaner can take a moment).
    deadline = time.time() + 30
    while ray_2_cpus.available_resources().get("CPU", 0) < 2.0 and time.time() < deadline:
        time.sleep(0.5)
    assert ray_2_cpus.available_resources().get("CPU") == 2.0


def test_a_training_finishes_beside_another_ray_instance_and_frees_its_cpus(bystander_ray, ray_2_cpus, tiny_config):
    from orchestrator.ray_train import run_on_ray

    assert ray_2_cpus.cluster_resources()["CPU"] == 2.0  # our own cluster, not the 1-CPU bystander
    result = run_on_ray(tiny_config("training.num_workers=2", "training.max_steps=4", "training.eval_every=2",
                                    "training.checkpoint_every=2"))
    assert result.metrics["step"] == 4
    deadline = time.time() + 30
    while ray_2_cpus.available_resources().get("CPU", 0) < 2.0 and time.time() < deadline:
        time.sleep(0.5)
    assert ray_2_cpus.available_resources().get("CPU") == 2.0
    assert bystander_ray.poll() is None  # and the other instance is untouched
