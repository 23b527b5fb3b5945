"""`trdpo run` end to end on a reduced demo: SFT -> two variants -> generate -> judge -> report,
on a real local Ray; MLflow structure, summary, and skipping finished stages on a rerun."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.pipeline import run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_pipeline_structure_summary_and_skip_on_rerun(ray_2_cpus, tiny_config, tmp_path, capsys):
    config = tiny_config(
        "pipeline.sft.overrides={training.max_steps: 8, training.learning_rate: 0.003}",
        "pipeline.variants=[{name: dpo, overrides: {training.ref_update: none, training.alpha: null, training.tau: null}},"
        " {name: soft, overrides: {training.ref_update: soft, training.alpha: 0.6, training.tau: 4}}]",
        "evaluation.num_prompts=4", "evaluation.sampling.num_samples=2", "evaluation.sampling.max_new_tokens=12",
        "evaluation.num_generation_actors=1", "evaluation.bootstrap_resamples=200",
        f"evaluation.cache_path={tmp_path}/judgments.sqlite", "training.max_steps=8", "training.eval_every=4",
        "training.checkpoint_every=4",
    )
    assert config.pipeline.sft.enabled and config.evaluation.enabled  # as the embedded demo has them
    result = run_pipeline(config)
    client = MlflowClient(config.tracking.resolved_tracking_uri())
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["trdpo.kind"] == "experiment"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"demo-sft", "demo-dpo", "demo-soft", "demo-vs-sft", "demo-vs-dpo"} <= set(children)
    assert children["demo-sft"].data.tags["trdpo.stage"] == "sft" and children["demo-soft"].data.tags["trdpo.ref_update"] == "soft"
    comparisons = {(c["policy"], c["baseline"]) for c in result["comparisons"]}
    assert comparisons == {("dpo", "sft"), ("soft", "sft"), ("soft", "dpo")}
    eval_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == children["demo-vs-sft"].info.run_id]
    assert len(eval_children) == 2 and all(r.info.status == "FINISHED" for r in eval_children)
    assert {"summary.csv", "summary.txt"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    table = result["table"]
    assert list(table["variant"]) == ["dpo", "soft"]
    assert {"win vs sft", "final val/kl_to_initial", "peak train/grad_norm", "distinct-2"} <= set(table.columns)
    assert table["peak train/grad_norm"].notna().all() and (table["final val/kl_to_initial"] > 0).all()
    assert "win vs dpo" in table.columns
    assert not [r for r in runs if r.info.status == "RUNNING"]

    capsys.readouterr()
    before = len(client.search_runs([experiment.experiment_id]))
    again = run_pipeline(config)
    out = capsys.readouterr().out
    for stage in ("sft", "train:dpo", "train:soft", "evaluate:vs-sft", "evaluate:vs-dpo"):
        assert f"skipping stage {stage}: already done" in out
    assert again["parent_run_id"] == result["parent_run_id"]
    assert len(client.search_runs([experiment.experiment_id])) == before  # nothing was run again


def test_pipeline_without_stages_trains_the_config_as_written(tiny_config):
    config = tiny_config("pipeline.sft.enabled=false", "pipeline.variants=[]", "pipeline.dpo_variant=null",
                         "evaluation.enabled=false", "training.max_steps=4", "training.eval_every=2", "training.checkpoint_every=2")
    result = run_pipeline(config, use_ray=False)
    assert list(result["trained"]) == ["train"] and result["comparisons"] == []
    assert list(result["table"]["variant"]) == ["train"]
    run = MlflowClient(config.tracking.resolved_tracking_uri()).get_run(result["trained"]["train"]["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == result["parent_run_id"] and run.data.tags["trdpo.ref_update"] == "soft"
