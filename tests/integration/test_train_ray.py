"""Training on Ray Train with FSDP2 (2 CPU workers, gloo) and sharded checkpoints: equivalence,
killed workers, crashed and damaged runs, resuming on another world size, refusing changed
settings, another model family, MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.ray_train import ClusterError, run_on_ray
from orchestrator.train import RunConflict
from trainers.state.checkpoint import checkpoint_steps, read_checkpoint
from fault_injection import KillOnce, UserMistakeAt
from trainers.loop import CHECKPOINTS
from trainers.state.storage import Storage
from mlflow_store import sqlite_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]

HARD = ("training.num_workers=2", "training.ref_update=hard", "training.alpha=null", "training.checkpoint_every=3")


def final_state(result):
    return read_checkpoint(Storage(result.run_uri).child(CHECKPOINTS))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def history(config, run_id, key):
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


@pytest.fixture(scope="module")
def straight_hard(ray_2_cpus, tiny_config_shared):
    """An uninterrupted 2-worker hard-update run, the yardstick of the fault tests."""
    return run_on_ray(tiny_config_shared("tracking.run_name=straight", *HARD))


def test_two_fsdp_workers_match_one_worker_with_the_same_global_batch(ray_2_cpus, straight_hard, tiny_config, tiny_config_shared):
    # The 2-worker run is the fault tests' yardstick (same config, same store): one training fewer.
    one = tiny_config("tracking.run_name=one", *HARD, "training.num_workers=1", "training.gradient_accumulation_steps=2")
    two = tiny_config_shared("tracking.run_name=straight", *HARD)
    r1, r2 = run_on_ray(one), straight_hard
    loss1, loss2 = dict(history(one, r1.run_id, "train/loss")), dict(history(two, r2.run_id, "train/loss"))
    assert sorted(loss1) == sorted(loss2) == list(range(1, 13))
    curve_diff = max(abs(loss1[s] - loss2[s]) for s in loss1)
    s1, s2 = final_state(r1), final_state(r2)
    policy_diff, reference_diff = max_diff(s1["policy"], s2["policy"]), max_diff(s1["reference"], s2["reference"])
    print(f"1 vs 2 workers: loss curve max diff {curve_diff:.2e}, policy {policy_diff:.2e}, reference {reference_diff:.2e}")
    # Same pairs per step, same averaging; only the order of float reductions differs.
    assert curve_diff < 1e-5 and policy_diff < 1e-4 and reference_diff < 1e-4
    # The reference moved exactly at tau, 2tau, 3tau in the real distributed run.
    updated = history(two, r2.run_id, "train/ref_updated")
    assert [s for s, v in updated if v == 1.0] == [4, 8, 12]
    assert s2["updater"]["update_steps"] == [4, 8, 12] and s2["world_size"] == 2
    client = MlflowClient(two.tracking.resolved_tracking_uri())
    run = client.get_run(r2.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trdpo.num_workers"] == "2"
    assert run.data.params["training.num_workers"] == "2"
    assert {"config.yaml", "policy"} <= {a.path for a in client.list_artifacts(r2.run_id)}
    # The export is a Hugging Face directory equal to the final checkpoint's policy.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(r2.model_dir).state_dict()
    assert max_diff(s2["policy"], exported) == 0.0
    # Every rank wrote its own shards of the newest checkpoint.
    newest = Storage(r2.run_uri).child(CHECKPOINTS).path(checkpoint_steps(Storage(r2.run_uri).child(CHECKPOINTS))[0][1])
    assert {"__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in Path(newest).iterdir()}
    # Everything was released: the 2 CPUs are free again.
    assert ray_2_cpus.available_resources().get("CPU") == 2.0
    # No Ray Data actor was started for a run that passes no Ray Dataset (DPOTrainer).
    from ray.util.state import list_actors

    assert list_actors(filters=[("class_name", "=", "RayTrainWorker")]) and \
        not list_actors(filters=[("class_name", "=", "DatasetManager")])


def test_killed_worker_is_replaced_and_the_run_ends_like_an_uninterrupted_one(straight_hard, tiny_config, inject_fault):
    inject_fault(KillOnce(7, 1))  # rank 1 SIGKILLs itself after step 7 (checkpoint at 6)
    faulty = tiny_config("tracking.run_name=faulty", "training.max_failures=1", *HARD)
    recovered = run_on_ray(faulty)
    assert Storage(recovered.run_uri).exists("fault-injected-7-1")
    a, b = final_state(straight_hard), final_state(recovered)
    assert max_diff(a["policy"], b["policy"]) == 0.0 and max_diff(a["reference"], b["reference"]) == 0.0
    assert b["updater"]["update_steps"] == [4, 8, 12]
    # Step 7 ran twice (before the kill and after the restart); its history has it once.
    assert [s for s, _ in history(faulty, recovered.run_id, "train/loss")] == list(range(1, 13))


def test_crashed_run_with_a_damaged_newest_checkpoint_resumes_from_the_one_before(straight_hard, tiny_config, inject_fault, capfd):
    inject_fault(KillOnce(8, 0))
    config = tiny_config("tracking.run_name=crashy", "training.max_failures=0", *HARD)
    with pytest.raises(Exception):
        run_on_ray(config)
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id], "attributes.run_name = 'crashy'")
    assert [r.info.status for r in runs] == ["FAILED"]
    checkpoints = Storage(config.tracking.output_dir).child("crashy", CHECKPOINTS)
    found = checkpoint_steps(checkpoints)
    assert [step for step, _ in found] == [6, 3]
    shard = checkpoints.path(found[0][1], "__1_0.distcp")
    with open(shard, "r+b") as handle:  # cut rank 1's shards of the newest checkpoint short
        handle.truncate(100)
    inject_fault(None)
    capfd.readouterr()
    resumed = run_on_ray(config)
    out = capfd.readouterr()
    said = out.out + out.err
    assert f"{found[0][1]} is damaged (shard file __1_0.distcp is cut short" in said
    assert f"resuming from {checkpoints.uri_of(found[1][1])} (step 3)" in said
    assert resumed.run_id == runs[0].info.run_id and client.get_run(resumed.run_id).info.status == "FINISHED"
    a, b = final_state(straight_hard), final_state(resumed)
    assert max_diff(a["policy"], b["policy"]) == 0.0 and max_diff(a["reference"], b["reference"]) == 0.0
    assert [s for s, _ in history(config, resumed.run_id, "train/loss")] == list(range(1, 13))
    assert not [r for r in client.search_runs([runs[0].info.experiment_id]) if r.info.status == "RUNNING"]


@pytest.fixture(scope="module")
def stopped_by_a_users_mistake(ray_2_cpus, tiny_config_shared):
    """A 2-worker run (restarts allowed) whose workers meet a user's mistake after step 8, after its
    checkpoints at 3 and 6: the run the mistake test reads (not retried) and the shrink test
    continues on 1 worker. Returns its config and the error it failed with."""
    from fault_injection import installer

    config = tiny_config_shared("tracking.run_name=shrink", *HARD, "training.max_failures=2")
    with pytest.MonkeyPatch.context() as patch:  # the inject_fault fixture's hook, for one module-scoped run
        installer(patch)(UserMistakeAt(8))
        with pytest.raises(Exception) as raised:
            run_on_ray(config)
    return config, raised.value


def test_a_two_worker_run_continues_on_one_worker_and_refuses_changed_settings(straight_hard, stopped_by_a_users_mistake, tiny_config_shared, capfd):
    # The 2-worker run stopped after step 8 (its newest checkpoint: step 6). One worker with twice
    # the accumulation: the same global batch, so the same run.
    one = tiny_config_shared("tracking.run_name=shrink", *HARD, "training.max_failures=2", "training.num_workers=1",
                             "training.gradient_accumulation_steps=2")
    capfd.readouterr()
    resumed = run_on_ray(one)
    assert "step_00000006 (step 6)" in capfd.readouterr().out
    state = final_state(resumed)
    assert state["world_size"] == 1 and state["updater"]["update_steps"] == [4, 8, 12]
    reference = final_state(straight_hard)
    assert max_diff(reference["policy"], state["policy"]) < 1e-4  # reduction order differs, nothing else
    assert [s for s, _ in history(one, resumed.run_id, "train/loss")] == list(range(1, 13))

    changed = tiny_config_shared("tracking.run_name=shrink", *HARD, "training.max_failures=2", "training.beta=0.2")
    with pytest.raises(RunConflict, match=r"run shrink exists with other settings: training\.beta \(0\.1 -> 0\.2\); rerun with --restart"):
        run_on_ray(changed)


def test_a_pythia_experiment_with_paths_relative_to_its_file_trains_on_two_workers(ray_2_cpus, tmp_path, monkeypatch):
    """The shape a user brings: a GPT-NeoX model and a data file beside the experiment file,
    named relative to it, the command run from somewhere else; 2 FSDP workers."""
    import json

    import yaml
    from transformers import AutoModelForCausalLM

    from orchestrator.config import load_experiment
    from trainers.fsdp_check import save_tiny_family
    from trainers.data.synthetic import make_pairs

    study = tmp_path / "study"
    save_tiny_family("gpt_neox", study / "pythia-tiny")
    with (study / "pairs.jsonl").open("w") as handle:
        for pair in make_pairs(130, seed=1):
            handle.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}) + "\n")
    (study / "exp.yaml").write_text(yaml.safe_dump({
        "name": "pythia", "model": {"name_or_path": "pythia-tiny"}, "tokenizer": {"kind": "pretrained"},
        "data": {"format": "preference", "path": "pairs.jsonl", "max_length": 64, "max_prompt_length": 32, "validation_fraction": 0.1},
        "training": {"ref_update": "soft", "alpha": 0.6, "tau": 2, "learning_rate": 1e-3, "per_device_batch_size": 4,
                     "max_steps": 4, "eval_every": 2, "checkpoint_every": 2, "num_workers": 2},
        "tracking": {"tracking_uri": sqlite_store(tmp_path / "m.db"), "output_dir": str(tmp_path / "runs"), "experiment_name": "tests"},
    }))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_experiment(study / "exp.yaml")
    assert config.data.path == str(study / "pairs.jsonl") and config.model.name_or_path == str(study / "pythia-tiny")
    result = run_on_ray(config)
    exported = AutoModelForCausalLM.from_pretrained(result.model_dir)
    initial = AutoModelForCausalLM.from_pretrained(study / "pythia-tiny")
    assert type(exported).__name__ == "GPTNeoXForCausalLM"
    assert max_diff(exported.state_dict(), initial.state_dict()) > 0  # it trained
    assert result.metrics["val/kl_to_initial"] > 0


def test_more_workers_than_the_cluster_has_is_refused_before_start(ray_2_cpus, tiny_config):
    with pytest.raises(ClusterError, match=r"training.num_workers: 3 workers .* need 3 CPU .* cluster has 2 CPU"):
        run_on_ray(tiny_config("training.num_workers=3"))


def test_cli_trains_on_ray_and_names_bad_input_in_one_line(ray_2_cpus, tmp_path):
    common = ["--set", f"tracking.tracking_uri={sqlite_store(tmp_path / 'm.db')}", "--set", f"tracking.output_dir={tmp_path}/runs"]
    too_many = CliRunner().invoke(main, ["train", "--set", "training.num_workers=4", *common])
    assert too_many.exit_code == 2 and "cluster has 2 CPU" in too_many.output and "Traceback" not in too_many.output
    missing_model = CliRunner().invoke(main, ["train", "--set", "model.tiny=null", "--set", f"model.name_or_path={tmp_path}/x", *common])
    assert missing_model.exit_code == 2 and "is not a model directory" in missing_model.output
    # A mistake found inside a Ray Train worker (a bad row of the validation file, read by the
    # workers only: its exit code and one line) and a successful `trdpo train` on Ray:
    # tests/integration/test_cli_console.py, the same CLI as a user runs it.


def test_a_users_mistake_on_a_worker_is_not_retried(stopped_by_a_users_mistake):
    from trainers.errors import user_facing_cause

    config, error = stopped_by_a_users_mistake  # max_failures=2, every worker raised after step 8
    cause = user_facing_cause(error)
    assert cause is not None and str(cause) == "data.train_path row 8: a mistake the user must fix"
    # One attempt, not 1 + max_failures: a restart would meet the same mistake.
    run_dir = Storage(config.tracking.output_dir).child("shrink")
    assert run_dir.read_text("user-mistake-attempts") == "1"
