"""The single-process training path end to end: MLflow content, reference schedule, exact resume."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.train import run_local
from trainers import loop, sessions
from trainers.state.checkpoint import read_checkpoint
from trainers.model.build import build_policy, build_tokenizer
from trainers.state.storage import Storage
from mlflow_store import sqlite_store

pytestmark = pytest.mark.slow


def final_state(result):
    """The newest checkpoint of a run, unsharded."""
    return read_checkpoint(Storage(result.run_uri).child(loop.CHECKPOINTS))


def test_training_logs_params_metrics_artifacts_and_moves_the_reference(tiny_config):
    config = tiny_config()
    result = run_local(config)
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.alpha"] == "0.6" and run.data.params["training.tau"] == "4"
    assert run.data.tags["trdpo.ref_update"] == "soft" and run.data.tags["git_commit"]
    history = client.get_metric_history(result.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 13))
    updates = {m.step: m.value for m in client.get_metric_history(result.run_id, "train/ref_updated")}
    assert [s for s, v in updates.items() if v == 1.0] == [4, 8, 12]
    assert [m.step for m in client.get_metric_history(result.run_id, "val/rewards/accuracy")] == [6, 12]
    assert client.get_metric_history(result.run_id, "train/grad_norm")[0].value > 0
    kl = [m.value for m in client.get_metric_history(result.run_id, "val/kl_to_initial")]
    assert len(kl) == 2 and 0 < kl[0] and all(v == v for v in kl)  # the policy has left the initial model
    assert client.get_metric_history(result.run_id, "system/model_state_mb_rank0")[0].value > 0
    artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {a.path for a in client.list_artifacts(result.run_id, "policy")}
    assert {"config.yaml", "policy/config.json", "policy/model.safetensors", "policy/tokenizer.json"} <= artifacts
    # The exported policy loads with plain transformers and equals the final checkpoint's policy.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(result.model_dir)
    state = final_state(result)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in state["policy"].items())
    # The reference really moved: it differs from the initial weights and from the policy.
    initial = build_policy(config.model, build_tokenizer(config.model, config.tokenizer)).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state["reference"][key], initial[key])
    assert not torch.equal(state["reference"][key], state["policy"][key])
    assert state["updater"] == {"n_updates": 3, "update_steps": [4, 8, 12]}


def test_vanilla_dpo_keeps_the_initial_reference(tiny_config):
    result = run_local(tiny_config("training.ref_update=none", "training.alpha=null", "training.tau=null"))
    state = final_state(result)
    config = tiny_config()
    initial = build_policy(config.model, build_tokenizer(config.model, config.tokenizer)).state_dict()
    assert all(torch.equal(state["reference"][k], v) for k, v in initial.items())


def test_interrupted_run_resumes_to_the_same_weights(tiny_config, monkeypatch):
    straight = run_local(tiny_config("tracking.run_name=straight", "training.ref_update=hard", "training.alpha=null"))
    config = tiny_config("tracking.run_name=interrupted", "training.ref_update=hard", "training.alpha=null")

    original_report = sessions.LocalSession.report

    def interrupt_after_first_checkpoint(self, metrics, checkpoint_dir=None, checkpoint_name=None):
        original_report(self, metrics, checkpoint_dir, checkpoint_name)
        if metrics["step"] == 6:  # right after the first checkpoint was saved
            raise KeyboardInterrupt

    monkeypatch.setattr(sessions.LocalSession, "report", interrupt_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_local(config)
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    killed = client.search_runs([client.get_experiment_by_name("tests").experiment_id], "attributes.run_name = 'interrupted'")
    assert [r.info.status for r in killed] == ["KILLED"]

    monkeypatch.setattr(sessions.LocalSession, "report", original_report)
    resumed = run_local(config)
    assert resumed.run_id == killed[0].info.run_id  # the same MLflow run continues
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    a, b = final_state(straight), final_state(resumed)
    for part in ("policy", "reference"):
        diff = max((a[part][k] - b[part][k]).abs().max().item() for k in a[part])
        assert diff == 0.0, f"{part} differs by {diff}"
    assert a["updater"] == b["updater"]
    steps = [m.step for m in client.get_metric_history(resumed.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(1, 13))


def test_a_run_resumed_at_its_last_checkpoint_reports_the_last_step_again(tiny_config, monkeypatch):
    """A checkpoint is stored before its report is sent; an interrupt in between left a resumed
    run with nothing to train and its runner (Tune, hence ASHA and the sweep's table) without the
    last step. The resumed run reports the last step's validation once, and logs nothing twice."""
    config = tiny_config("tracking.run_name=cut")
    original_report = sessions.LocalSession.report

    def interrupt_between_store_and_report(self, metrics, checkpoint_dir=None, checkpoint_name=None):
        if metrics["step"] == 12:
            self.on_report = lambda *_: (_ for _ in ()).throw(KeyboardInterrupt())
        original_report(self, metrics, checkpoint_dir, checkpoint_name)

    monkeypatch.setattr(sessions.LocalSession, "report", interrupt_between_store_and_report)
    with pytest.raises(KeyboardInterrupt):
        run_local(config)
    reports = []

    def record(self, metrics, checkpoint_dir=None, checkpoint_name=None):
        reports.append((dict(metrics), checkpoint_dir))
        original_report(self, metrics, checkpoint_dir, checkpoint_name)

    monkeypatch.setattr(sessions.LocalSession, "report", record)
    resumed = run_local(config)
    assert [(m["step"], saved) for m, saved in reports] == [(12, None)]
    assert 0.0 <= reports[0][0]["val/rewards/accuracy"] <= 1.0 and "val/loss" in reports[0][0]
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    assert [m.step for m in client.get_metric_history(resumed.run_id, "val/rewards/accuracy")] == [6, 12]
    assert Storage(resumed.run_uri).exists(loop.POLICY, "config.json")


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["train", "--no-ray", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "no such file" in missing.output and "Traceback" not in missing.output
    bad_data = runner.invoke(main, ["train", "--no-ray", "--set", "data.format=preference", "--set", f"data.path={tmp_path}/absent.jsonl",
                                    "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    assert bad_data.exit_code == 2 and "absent.jsonl: no such file" in bad_data.output
    bad_model = runner.invoke(main, ["train", "--no-ray", "--set", "model.tiny=null", "--set", f"model.name_or_path={tmp_path}/none"])
    assert bad_model.exit_code == 2 and "is not a model directory" in bad_model.output


def test_sft_stage_lowers_the_validation_nll(tiny_config):
    result = run_local(tiny_config("training.stage=sft", "training.ref_update=none", "training.alpha=null",
                                   "training.tau=null", "training.learning_rate=3e-3"))
    client = MlflowClient(tiny_config().tracking.resolved_tracking_uri())
    nll = [m.value for m in sorted(client.get_metric_history(result.run_id, "val/loss"), key=lambda m: m.step)]
    assert len(nll) == 2 and nll[1] < nll[0] < 6.0  # per-token NLL falls from ~ln(259) = 5.56
    assert final_state(result)["reference"] is None


def test_rerun_skips_a_finished_run_refuses_changed_settings_and_restart_trains_over(tmp_path):
    common = ["train", "--no-ray", "--set", f"tracking.tracking_uri={sqlite_store(tmp_path / 'm.db')}",
              "--set", f"tracking.output_dir={tmp_path}/runs", "--set", "tracking.run_name=rerun",
              "--set", "training.max_steps=4", "--set", "training.tau=2", "--set", "training.checkpoint_every=2",
              "--set", "data.synthetic.num_pairs=120"]
    runner = CliRunner()
    first = runner.invoke(main, common)
    assert first.exit_code == 0, first.output
    run_id = re.search(r"done: run rerun \((\w+)\)", first.output).group(1)
    again = runner.invoke(main, common)
    assert again.exit_code == 0 and "already finished with these settings" in again.output and run_id in again.output
    changed = runner.invoke(main, [*common, "--set", "training.beta=0.2", "--set", "data.max_length=80"])
    assert changed.exit_code == 2 and "Traceback" not in changed.output
    assert changed.output.strip().count("\n") == 0  # one line
    assert "data.max_length (96 -> 80), training.beta (0.1 -> 0.2)" in changed.output and "--restart" in changed.output
    # Execution-only settings are not a different run: the finished run is recognised.
    more_logging = runner.invoke(main, [*common, "--set", "training.log_every=2"])
    assert "already finished" in more_logging.output
    restarted = runner.invoke(main, [*common, "--set", "training.beta=0.2", "--restart"])
    assert restarted.exit_code == 0, restarted.output
    assert "deleting run rerun" in restarted.output and run_id not in restarted.output.splitlines()[-3]


def test_bad_validation_rows_are_counted_and_reported_like_training_rows(tiny_config, tmp_path, capsys):
    import json

    from trainers.data.synthetic import make_pairs

    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in make_pairs(70, seed=2)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:60]))
    bad = [*rows[60:], {"prompt": "x", "chosen": "same", "rejected": "same"}, {"prompt": "no responses"}]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    config = tiny_config("data.format=preference", f"data.path={tmp_path}/train.jsonl", f"data.validation_path={tmp_path}/val.jsonl",
                         "data.on_bad_row=skip", "training.max_steps=2", "training.tau=1", "training.eval_every=2",
                         "training.checkpoint_every=2")
    run_local(config)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("[trdpo] validation:"))
    assert f"{tmp_path}/val.jsonl: 12 rows read, 10 kept; skipped:" in line
    assert "1 chosen and rejected are identical" in line and "1 missing field 'chosen'" in line


def test_a_run_without_validation_data_reports_no_validation_metrics(tmp_path):
    """No validation pairs: no val/ metric at all. A 0.0 (a sum divided by max(count, 1)) would look
    like the best trial to a sweep minimising val/loss."""
    uri = sqlite_store(tmp_path / "m.db")
    outcome = CliRunner().invoke(main, ["train", "--no-ray", "--set", f"tracking.tracking_uri={uri}",
                                        "--set", f"tracking.output_dir={tmp_path}/runs", "--set", "tracking.run_name=no-holdout",
                                        "--set", "data.validation_fraction=0", "--set", "data.synthetic.num_pairs=120",
                                        "--set", "training.max_steps=4", "--set", "training.tau=2",
                                        "--set", "training.eval_every=2", "--set", "training.checkpoint_every=null"])
    assert outcome.exit_code == 0, outcome.output
    assert "no validation metrics (the run had no validation data)" in outcome.output
    assert not re.search(r"\bval/\w", outcome.output)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("trdpo-demo").experiment_id], "attributes.run_name = 'no-holdout'")[0]
    assert "train/loss" in run.data.metrics
    assert not [key for key in run.data.metrics if key.startswith("val/")]
