"""A finished study's outputs: the summary table (printed, logged to the parent run and shown as
its description) and the HTML report, written beside the run's outputs and logged as artifacts."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from orchestrator.config import ExperimentConfig
from orchestrator.study.collect import collect_study
from orchestrator.study.report import build_report
from trainers.state.storage import Storage

REPORT_DIR = "report"
NOT_APPLICABLE = "—"  # what the HTML report shows in an empty cell


def summary_table(config: ExperimentConfig, trained: dict[tuple[str, int], dict], comparisons: list[dict], client: MlflowClient):
    """One row per variant (final policies, averaged over seeds): printed, logged to the parent
    run as files and as its description, so the MLflow UI opens on it."""
    import pandas as pd

    rows = []
    for name in dict.fromkeys(n for n, _ in trained):
        records = [r for (n, _), r in trained.items() if n == name]
        peaks, kls = [], []
        for record in records:
            grad = [m.value for m in client.get_metric_history(record["run_id"], "train/grad_norm")]
            kl = sorted(client.get_metric_history(record["run_id"], "val/kl_to_initial"), key=lambda m: m.step)
            peaks += [max(grad)] if grad else []
            kls += [kl[-1].value] if kl else []
        row: dict[str, Any] = {"variant": name, "seeds": len(records),
                               "final val/kl_to_initial": sum(kls) / len(kls) if kls else None,
                               "peak train/grad_norm": max(peaks) if peaks else None}
        for baseline in dict.fromkeys(c["baseline"] for c in comparisons):
            mine = [c["metrics"] for c in comparisons if c["policy"] == name and c["baseline"] == baseline]
            if mine:
                row[f"win vs {baseline}"] = _mean_of(mine, "eval/win_rate", 3)
                if baseline in ("sft", "initial"):
                    row["eval/kl"] = _mean_of(mine, "eval/kl", 4)
                    row["distinct-2"] = _mean_of(mine, "diversity/policy/distinct_2", 3)
        rows.append(row)
    table = pd.DataFrame(rows)
    text = summary_text(table)
    print("\n" + text + "\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "summary.csv", index=False)
        (Path(tmp) / "summary.txt").write_text(text + "\n")
        mlflow.log_artifact(str(Path(tmp) / "summary.csv"))
        mlflow.log_artifact(str(Path(tmp) / "summary.txt"))
    mlflow.set_tag("mlflow.note.content", "### Summary (final policies, mean over seeds)\n\n" + markdown_table(table)
                   + "\n\nThe study report (paired CIs, quality vs KL) is the artifact report/report.html.")
    return table


def summary_text(table) -> str:
    """The summary table as printed: a cell where a comparison does not apply (dpo's win vs dpo)
    or has no value shows a dash, as in the HTML report, never NaN."""
    return table.to_string(index=False, na_rep=NOT_APPLICABLE)


def _mean_of(metrics: list[dict], key: str, digits: int) -> float | None:
    """The mean of ``key`` over the comparisons that have it (None when none has: an empty cell)."""
    values = [m[key] for m in metrics if m.get(key) is not None and m[key] == m[key]]
    return round(sum(values) / len(values), digits) if values else None


def markdown_table(table) -> str:
    """A DataFrame as a Markdown table (the MLflow UI renders run descriptions as Markdown)."""
    def cell(value) -> str:
        return NOT_APPLICABLE if value is None or value != value else (f"{value:.4g}" if isinstance(value, float) else str(value))

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def write_report(client: MlflowClient, parent_run_id: str, out_dir: Path) -> Path:
    """The study of experiment run ``parent_run_id``, from MLflow alone: ``report.html`` with its
    PNGs and the data behind it (``study.json``) in ``out_dir``; returns the HTML's path."""
    data = collect_study(client, parent_run_id)
    html = build_report(data, out_dir)
    data.save(out_dir / "study.json")
    return html


def publish_report(client: MlflowClient, parent_run_id: str, store: Storage) -> str:
    """Build the study report from MLflow, log it to the parent run and write it beside the
    outputs; returns where it was written."""
    with tempfile.TemporaryDirectory(prefix="trdpo-report-") as tmp:
        html = write_report(client, parent_run_id, Path(tmp))
        client.log_artifacts(parent_run_id, tmp, REPORT_DIR)
        store.put_dir(tmp, REPORT_DIR)
    return store.uri_of(REPORT_DIR, html.name)
