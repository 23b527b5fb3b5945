"""Training on Ray Train with FSDP2 (2 CPU workers, gloo): equivalence, faults, resume, MLflow."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.ray_train import ClusterError, run_on_ray

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def state_of(result):
    return torch.load(result.checkpoint_dir / "state.pt", map_location="cpu", weights_only=False)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def history(config, run_id, key):
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_two_fsdp_workers_match_one_worker_with_the_same_global_batch(ray_2_cpus, tiny_config):
    one = tiny_config("tracking.run_name=one", "training.num_workers=1", "training.gradient_accumulation_steps=2")
    two = tiny_config("tracking.run_name=two", "training.num_workers=2", "training.gradient_accumulation_steps=1")
    r1, r2 = run_on_ray(one), run_on_ray(two)
    loss1, loss2 = history(one, r1.run_id, "train/loss"), history(two, r2.run_id, "train/loss")
    assert sorted(loss1) == sorted(loss2) == list(range(1, 13))
    curve_diff = max(abs(loss1[s] - loss2[s]) for s in loss1)
    s1, s2 = state_of(r1), state_of(r2)
    policy_diff, reference_diff = max_diff(s1["policy"], s2["policy"]), max_diff(s1["reference"], s2["reference"])
    print(f"1 vs 2 workers: loss curve max diff {curve_diff:.2e}, policy {policy_diff:.2e}, reference {reference_diff:.2e}")
    # Same pairs per step, same averaging; only the order of float reductions differs.
    assert curve_diff < 1e-4 and policy_diff < 1e-4 and reference_diff < 1e-4
    # The reference moved exactly at tau, 2tau, 3tau in the real distributed run.
    updated = history(two, r2.run_id, "train/ref_updated")
    assert [s for s, v in sorted(updated.items()) if v == 1.0] == [4, 8, 12]
    assert s2["updater"]["update_steps"] == [4, 8, 12]
    client = MlflowClient(two.tracking.resolved_tracking_uri())
    run = client.get_run(r2.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trdpo.num_workers"] == "2"
    assert run.data.params["training.num_workers"] == "2"
    assert {"config.yaml", "policy"} <= {a.path for a in client.list_artifacts(r2.run_id)}
    # Everything was released: the 2 CPUs are free again.
    assert ray_2_cpus.available_resources().get("CPU") == 2.0


def test_killed_worker_is_replaced_and_the_run_ends_like_an_uninterrupted_one(ray_2_cpus, tiny_config, monkeypatch):
    common = ("training.num_workers=2", "training.ref_update=hard", "training.alpha=null")
    straight = run_on_ray(tiny_config("tracking.run_name=straight", *common))
    monkeypatch.setenv("TRDPO_FAULT_KILL", "7:1")  # rank 1 SIGKILLs itself after step 7 (checkpoint at 6)
    faulty = tiny_config("tracking.run_name=faulty", "training.max_failures=1", *common)
    recovered = run_on_ray(faulty)
    assert any(p.name.startswith("fault-injected") for p in (recovered.model_dir.parent).iterdir())
    a, b = state_of(straight), state_of(recovered)
    assert max_diff(a["policy"], b["policy"]) == 0.0 and max_diff(a["reference"], b["reference"]) == 0.0
    assert b["updater"]["update_steps"] == [4, 8, 12]


def test_crashed_run_resumes_when_the_command_is_rerun(ray_2_cpus, tiny_config, monkeypatch):
    common = ("training.num_workers=2", "training.ref_update=soft")
    straight = run_on_ray(tiny_config("tracking.run_name=straight2", *common))
    monkeypatch.setenv("TRDPO_FAULT_KILL", "8:0")
    config = tiny_config("tracking.run_name=crashy", "training.max_failures=0", *common)
    with pytest.raises(Exception):
        run_on_ray(config)
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id], "attributes.run_name = 'crashy'")
    assert [r.info.status for r in runs] == ["FAILED"]
    monkeypatch.delenv("TRDPO_FAULT_KILL")
    resumed = run_on_ray(config)
    assert resumed.run_id == runs[0].info.run_id
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    a, b = state_of(straight), state_of(resumed)
    assert max_diff(a["policy"], b["policy"]) == 0.0 and max_diff(a["reference"], b["reference"]) == 0.0
    assert not [r for r in client.search_runs([runs[0].info.experiment_id]) if r.info.status == "RUNNING"]


def test_more_workers_than_the_cluster_has_is_refused_before_start(ray_2_cpus, tiny_config):
    with pytest.raises(ClusterError, match=r"training.num_workers: 3 workers .* need 3 CPU .* cluster has 2 CPU"):
        run_on_ray(tiny_config("training.num_workers=3"))


def test_cli_trains_on_ray_and_names_bad_input_in_one_line(ray_2_cpus, tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main

    common = ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db", "--set", f"tracking.output_dir={tmp_path}/runs"]
    too_many = CliRunner().invoke(main, ["train", "--set", "training.num_workers=4", *common])
    assert too_many.exit_code == 2 and "cluster has 2 CPU" in too_many.output and "Traceback" not in too_many.output
    missing_model = CliRunner().invoke(main, ["train", "--set", "model.tiny=null", "--set", f"model.name_or_path={tmp_path}/x", *common])
    assert missing_model.exit_code == 2 and "is not a model directory" in missing_model.output
    ok = CliRunner().invoke(main, ["train", "--set", "training.max_steps=4", "--set", "training.tau=2",
                                   "--set", "training.eval_every=2", "--set", "training.checkpoint_every=2", *common])
    assert ok.exit_code == 0, ok.output
    assert "final validation {'val/loss'" in ok.output and (tmp_path / "runs" / "demo-soft-a0.6-t2" / "policy" / "config.json").exists()
