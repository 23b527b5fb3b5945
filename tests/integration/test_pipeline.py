"""`trdpo run` end to end on a reduced demo, as a study: shared SFT -> two variants x two seeds,
policies exported along the way -> judged against SFT with a sampled KL, finals against DPO ->
the HTML report, rebuilt from MLflow alone by `trdpo report`; MLflow structure, summary, and
skipping what is done on a rerun. Training runs in this process (the Ray Train path has its own
tests); evaluation uses a real local Ray actor pool."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.pipeline import run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_pipeline_study_report_and_skip_on_rerun(ray_2_cpus, tiny_config, tmp_path, capsys):
    config = tiny_config(
        "pipeline.sft.overrides={training.max_steps: 8, training.learning_rate: 0.003}",
        "pipeline.variants=[{name: dpo, overrides: {training.ref_update: none, training.alpha: null, training.tau: null}},"
        " {name: soft, overrides: {training.ref_update: soft, training.alpha: 0.6, training.tau: 4}}]",
        "pipeline.seeds=[0, 1]", "evaluation.checkpoints=4",
        "evaluation.num_prompts=4", "evaluation.sampling.num_samples=2", "evaluation.sampling.max_new_tokens=12",
        "evaluation.num_generation_actors=1", "evaluation.bootstrap_resamples=200",
        f"evaluation.cache_path={tmp_path}/judgments.sqlite", "training.max_steps=8", "training.eval_every=4",
        "training.checkpoint_every=4", "training.learning_rate=0.003",
    )
    assert config.pipeline.sft.enabled and config.evaluation.enabled  # as the embedded demo has them
    result = run_pipeline(config, use_ray=False)
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["trdpo.kind"] == "experiment"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "| variant |" in parent.data.tags["mlflow.note.content"]  # the summary is the run's description
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"demo-sft", "demo-dpo-s0", "demo-soft-s0", "demo-dpo-s1", "demo-soft-s1", "demo-vs-sft-s0", "demo-vs-dpo-s1"} <= set(children)
    assert children["demo-soft-s1"].data.params["training.seed"] == "1"
    assert children["demo-soft-s1"].data.tags["trdpo.variant"] == "soft"
    # One SFT, shared: every variant of every seed starts from its export.
    assert {c.data.params["model.name_or_path"] for n, c in children.items() if n.startswith(("demo-dpo", "demo-soft"))} == \
        {result["trained"][("dpo", 0)]["model_dir"].replace("dpo-s0", "sft")}
    comparisons = {(c["policy"], c["baseline"], c["seed"]) for c in result["comparisons"]}
    assert {("dpo@4", "sft", 0), ("soft", "sft", 1), ("soft", "dpo", 0), ("soft", "dpo", 1)} <= comparisons
    kl_runs = [r for r in runs if r.data.tags.get("trdpo.role") == "comparison" and r.data.tags["trdpo.baseline"] == "sft"]
    # 2 variants x 2 seeds x 2 steps, each with a sampled KL (a Monte Carlo estimate: it can dip below 0)
    assert len(kl_runs) == 8 and all(math.isfinite(r.data.metrics["eval/kl"]) and "eval/kl_se" in r.data.metrics for r in kl_runs)
    assert not [r for r in runs if r.info.status == "RUNNING"]

    # The report: beside the outputs and in the parent run, every section that has data.
    html = Path(result["report"]).read_text()
    for figure in ("fig-frontier", "fig-winrates", "fig-gradnorm", "fig-kl-steps", "fig-diversity"):
        assert f'id="{figure}"' in html, figure
    assert 'id="tbl-matched-kl"' in html and 'id="tbl-end-of-training"' in html
    assert {"report/report.html", "report/study.json", "report/fig-frontier.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    study = json.loads((Path(result["report"]).parent / "study.json").read_text())
    sft_rows = {r["variant"]: r for r in study["win_rates"] if r["baseline"] == "sft"}
    assert set(sft_rows) == {"dpo", "soft"} and all(r["seeds"] == 2 and r["n"] == 8 for r in sft_rows.values())
    assert all(r["ci_low"] <= r["win_rate"] <= r["ci_high"] for r in study["win_rates"])
    assert {(p["variant"], p["step"]) for p in study["frontier"] if p["seed"] is None} == {
        ("dpo", 4), ("dpo", 8), ("soft", 4), ("soft", 8)}
    assert {h["seed"] for h in study["grad_norms"]} == {0, 1}

    # `trdpo report RUN_ID` rebuilds the same study from MLflow alone (the outputs may be gone).
    out = tmp_path / "rebuilt"
    rebuilt = CliRunner().invoke(main, ["report", parent.info.run_id, "--out", str(out), "--set",
                                        f"tracking.tracking_uri={config.tracking.tracking_uri}", "--set", "tracking.experiment_name=tests"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert rebuilt.output.strip().endswith(f"report: {out / 'report.html'}")
    assert 'id="fig-frontier"' in (out / "report.html").read_text()
    assert json.loads((out / "study.json").read_text()) == study

    capsys.readouterr()
    before = len(client.search_runs([experiment.experiment_id], max_results=1000))
    again = run_pipeline(config, use_ray=False)
    out = capsys.readouterr().out
    for run in ("demo-sft", "demo-dpo-s0", "demo-soft-s1"):  # the same rule as `trdpo train`: a finished run is not redone
        assert f"run {run} already finished with these settings" in out
    for stage in ("evaluate:vs-sft-s0", "evaluate:vs-dpo-s1"):
        assert f"skipping stage {stage}: already done with these inputs" in out
    assert again["parent_run_id"] == result["parent_run_id"]
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == before  # nothing was run again


def test_pipeline_without_stages_trains_the_config_as_written(tiny_config):
    config = tiny_config("pipeline.sft.enabled=false", "pipeline.variants=[]", "pipeline.dpo_variant=null", "pipeline.seeds=null",
                         "evaluation.enabled=false", "training.max_steps=4", "training.eval_every=2", "training.checkpoint_every=2")
    result = run_pipeline(config, use_ray=False)
    assert list(result["trained"]) == [("train", config.training.seed)] and result["comparisons"] == []


def test_a_lora_study_trains_adapters_samples_base_plus_adapter_and_measures_kl_against_the_base(ray_2_cpus, tiny_config, tmp_path):
    """The offline demo with `--set model.lora.rank=4`: SFT and TR-DPO train adapters only, their
    checkpoints hold adapters only, and the evaluation samples the base plus the policy adapter."""
    from trainers.loop import CHECKPOINTS
    from trainers.state.checkpoint import read_checkpoint
    from trainers.state.storage import Storage

    config = tiny_config(
        "model.lora.rank=4", "model.lora.alpha=8",
        "pipeline.sft.overrides={training.max_steps: 4, training.learning_rate: 0.01}",
        "pipeline.variants=[{name: soft, overrides: {training.ref_update: soft, training.alpha: 0.6, training.tau: 2}}]",
        "pipeline.dpo_variant=null", "pipeline.seeds=[0]", "evaluation.checkpoints=2",
        "evaluation.num_prompts=4", "evaluation.sampling.num_samples=2", "evaluation.sampling.max_new_tokens=12",
        "evaluation.num_generation_actors=1", "evaluation.bootstrap_resamples=100",
        f"evaluation.cache_path={tmp_path}/judgments.sqlite", "training.max_steps=4", "training.eval_every=2",
        "training.checkpoint_every=2", "training.learning_rate=0.01",
    )
    result = run_pipeline(config, use_ray=False)
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id], max_results=1000)
    trained = {r.info.run_name: r for r in runs if r.data.tags.get("trdpo.kind") != "experiment" and "training.stage" in r.data.params}
    assert {"demo-sft", "demo-soft"} <= set(trained)  # one seed: no suffix
    assert all(r.data.params["model.lora.rank"] == "4" and r.info.status == "FINISHED" for r in trained.values())
    soft = result["trained"][("soft", 0)]
    saved = read_checkpoint(Storage(soft["run_uri"]).child(CHECKPOINTS))
    assert saved["step"] == 4 and saved["policy"] and all(".lora_" in k for k in saved["policy"])  # adapters only
    assert saved["updater"]["lora"] is not None  # the soft reference's low-rank terms
    kl_runs = [r for r in runs if r.data.tags.get("trdpo.role") == "comparison" and r.data.tags["trdpo.baseline"] == "sft"]
    assert len(kl_runs) == 2 and all(math.isfinite(r.data.metrics["eval/kl"]) for r in kl_runs)
    assert max(r.data.metrics["eval/kl"] for r in kl_runs) > 0  # the adapter moved the policy off its base
    assert Path(result["report"]).exists()
