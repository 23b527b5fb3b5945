"""After Tune: one row per trial (its status, last and best metric), every child run closed with
that status, the results table, the winning trial and the sweep's figures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator.sweep.config import LoadedSweep, trial_config
from orchestrator.sweep.ledger import TrialLedger
from orchestrator.sweep.space import trial_values
from orchestrator.sweep.trial import STATUS_TAG, TRIAL_TAG


@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]
    status: str
    steps: int
    last: float | None
    best: float | None
    error: str | None
    mlflow_run_id: str | None


def _metric_stats(result, metric: str, mode: str) -> tuple[float | None, float | None]:
    frame = result.metrics_dataframe if result is not None else None
    if frame is None or metric not in frame:
        return None, None
    values = frame[metric].dropna()
    if values.empty:
        return None, None
    return float(values.iloc[-1]), float(values.max() if mode == "max" else values.min())


def summarize(results, ledger: TrialLedger, loaded: LoadedSweep, client: MlflowClient, parent_run_id: str) -> list[TrialRow]:
    """One row per trial, and every child run closed with its final status."""
    metric, mode = loaded.sweep.scheduler.metric, loaded.sweep.scheduler.mode
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = {r.data.tags.get(TRIAL_TAG): r for r in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")}
    by_trial = {r.metrics.get("trial_id"): r for r in results if r.metrics}
    rows = []
    for trial_id, record in ledger.trials.items():
        result = by_trial.get(trial_id)
        values = trial_values(loaded.points, record["config"])
        max_steps = trial_config(loaded.base_tree, values, "x").training.max_steps
        steps = record.get("step", 0)
        last, best = _metric_stats(result, metric, mode)
        error = None
        if result is not None and result.error is not None:
            error = str(result.error).strip().splitlines()[-1][:500]
        child = children.get(trial_id)
        # The trial function tags its run "completed" once its training has exported the policy.
        # Tune may not know: a checkpoint is stored before its report reaches Tune, and a trial
        # interrupted in between resumes at its last step, with nothing left to train or report.
        trained_to_the_end = child is not None and child.data.tags.get(STATUS_TAG) == "completed"
        if record["state"] == "errored":
            status, mlflow_status = "errored", "FAILED"
            error = error or record.get("error")
        elif trained_to_the_end:
            status, mlflow_status = "completed", "FINISHED"
            steps = max_steps if max_steps is not None else steps
        elif record["state"] != "ended":
            status, mlflow_status = "interrupted", "KILLED"
        elif max_steps is not None and steps < max_steps:
            status, mlflow_status = f"stopped early at step {steps}", "FINISHED"
        else:
            status, mlflow_status = "completed", "FINISHED"
        run_id = child.info.run_id if child is not None else None
        if run_id:
            client.set_tag(run_id, STATUS_TAG, status)
            if error:
                client.set_tag(run_id, "trdpo.error", error)
            client.set_terminated(run_id, mlflow_status)
        rows.append(TrialRow(trial_id, values, status, steps, last, best, error, run_id))
    return rows


def results_table(rows: list[TrialRow], metric: str) -> pd.DataFrame:
    records = []
    for row in rows:
        records.append({"trial_id": row.trial_id, **{k: v for k, v in row.values.items()}, "status": row.status,
                        "steps": row.steps, f"last {metric}": row.last, f"best {metric}": row.best,
                        "error": row.error or "", "mlflow_run_id": row.mlflow_run_id})
    return pd.DataFrame.from_records(records)


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.best is not None and r.status != "errored"]
    if not scored:
        return None
    # Rank by the metric at the end of each trial's run: a trial ASHA stopped early is not a winner.
    finished = [r for r in scored if r.status == "completed"] or scored
    return (max if mode == "max" else min)(finished, key=lambda r: r.last if r.last is not None else r.best)


def plots(rows: list[TrialRow], loaded: LoadedSweep, out_dir: Path) -> list[Path]:
    """The metric at each trial's last step over α × τ (soft trials) and over τ (hard trials),
    drawn by the study report's own figures: cells and points average a setting's trials (seeds)
    and the colour map follows the sweep's mode."""
    from orchestrator.study.data import SweepRow
    from orchestrator.study.figures import figure_sweep_heatmap, figure_sweep_tau
    from orchestrator.study.stats import sweep_grid

    metric, mode = loaded.sweep.scheduler.metric, loaded.sweep.scheduler.mode
    points = []
    for row in rows:
        if row.last is None:
            continue
        # The trial's whole config, not only the sampled values: α or τ may be fixed in the base file.
        training = trial_config(loaded.base_tree, row.values, "x").training
        points.append(SweepRow(training.ref_update, training.alpha, training.tau, row.last))
    written = []
    alphas, taus, _ = sweep_grid(points)
    if alphas and taus:
        written.append((out_dir / "heatmap_alpha_tau.png", figure_sweep_heatmap(points, metric, mode)))
    if any(p.ref_update == "hard" and p.tau is not None for p in points):
        written.append((out_dir / "curve_hard_tau.png", figure_sweep_tau(points, metric)))
    for path, figure in written:
        figure.savefig(path)
    return [path for path, _ in written]

