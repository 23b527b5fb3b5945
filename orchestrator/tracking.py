"""MLflow tracking from the driver only: one run per training, params flattened, no run left RUNNING."""

from __future__ import annotations

import contextlib
import subprocess
import time
import tempfile
from pathlib import Path
from typing import Iterator

import mlflow

from orchestrator.config import ExperimentConfig


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class TrackingUnavailable(RuntimeError):
    """The configured MLflow tracking server does not answer."""


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when an http(s) tracking URI does not answer (MLflow's own
    client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(f"tracking.tracking_uri: cannot reach the MLflow server at {uri} ({reason})") from None


def configure(config: ExperimentConfig) -> str:
    uri = config.tracking.resolved_tracking_uri()
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(config.tracking.experiment_name)
    return uri


@contextlib.contextmanager
def tracked_run(config: ExperimentConfig, run_name: str, tags: dict[str, str] | None = None,
                parent_run_id: str | None = None, run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open (or re-open, by ``run_id``) a run, log the resolved config, and always close it:
    FINISHED on success, KILLED on Ctrl-C, FAILED on any other error."""
    configure(config)
    all_tags = {"trdpo.stage": config.training.stage, "trdpo.ref_update": config.training.ref_update,
                "git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=all_tags,
                           nested=mlflow.active_run() is not None)
    try:
        if run_id is None:
            mlflow.log_params(config.flat_params())
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(config.to_yaml(), encoding="utf-8")
                mlflow.log_artifact(str(path))
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def find_run(config: ExperimentConfig, run_name: str) -> mlflow.entities.Run | None:
    """The latest run with this name in the configured experiment (for resuming)."""
    configure(config)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment_name)
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0] if runs else None


class StepLogger:
    """Logs one step's metrics to an MLflow run through the client API and prints progress.

    Picklable, so the driver hands it to the training workers, where rank 0 calls it: metrics go
    to MLflow without a ``ray.train.report`` round trip per step, and from one process only."""

    def __init__(self, tracking_uri: str, run_id: str, label: str):
        self.tracking_uri, self.run_id, self.label = tracking_uri, run_id, label
        self._progress = None
        self._client = None

    def __getstate__(self) -> dict:  # the client and progress state stay in the process that made them
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "label": self.label, "_progress": None, "_client": None}

    def __call__(self, metrics: dict) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from orchestrator.progress import StepProgress

        step, timestamp = int(metrics["step"]), int(time.time() * 1000)
        entries = [Metric(k, float(v), timestamp, step) for k, v in metrics.items() if k != "step"]
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        self._client.log_batch(self.run_id, metrics=entries)
        if self._progress is None:
            self._progress = StepProgress(None, self.label)
        extra = {"val_acc": metrics["val/rewards/accuracy"]} if "val/rewards/accuracy" in metrics else {}
        self._progress.update(step, total=round(step / metrics["train/progress"]), loss=metrics["train/loss"], **extra)
