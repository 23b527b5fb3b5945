"""The study's closing summary table: a comparison that does not apply shows a dash, never NaN."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient

from orchestrator.study.publish import NOT_APPLICABLE, summary_table
from mlflow_store import sqlite_store


def test_a_comparison_that_does_not_apply_prints_a_dash(tmp_path, monkeypatch, capsys):
    uri = sqlite_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("summary", artifact_location=str(tmp_path / "artifacts"))
    trained = {}
    for name in ("dpo", "trdpo"):
        run = client.create_run(experiment, run_name=name)
        client.log_metric(run.info.run_id, "train/grad_norm", 2.0, step=1)
        client.log_metric(run.info.run_id, "val/kl_to_initial", 0.5, step=1)
        trained[(name, 0)] = {"run_id": run.info.run_id}
    comparisons = [
        {"policy": "dpo", "baseline": "sft", "metrics": {"eval/win_rate": 0.6, "eval/kl": 0.5}},
        {"policy": "trdpo", "baseline": "sft", "metrics": {"eval/win_rate": 0.7, "eval/kl": 0.4}},
        {"policy": "trdpo", "baseline": "dpo", "metrics": {"eval/win_rate": 0.55}},  # dpo is never judged against itself
    ]
    with mlflow.start_run(experiment_id=experiment) as parent:
        table = summary_table(None, trained, comparisons, client)
    printed = capsys.readouterr().out
    assert "NaN" not in printed and "nan" not in printed
    dpo_line = next(line for line in printed.splitlines() if line.strip().startswith("dpo"))
    assert dpo_line.split()[-1] == NOT_APPLICABLE  # its "win vs dpo" cell
    assert list(table.columns)[-1] == "win vs dpo"
    note = client.get_run(parent.info.run_id).data.tags["mlflow.note.content"]
    assert "nan" not in note.lower() and f"| {NOT_APPLICABLE} |" in note
    summary_txt = tmp_path / "artifacts" / parent.info.run_id / "artifacts" / "summary.txt"
    assert "NaN" not in summary_txt.read_text()
