"""MLflow tracking from the driver only: one run per training, params flattened, no run left RUNNING."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from orchestrator.config import ExperimentConfig, TrackingConfig
from orchestrator.console import capture_library_logs
from trainers.errors import UserFacingError, user_facing_cause


def git_commit() -> str:
    if os.environ.get("TRDPO_GIT_COMMIT"):  # a submitted job: its working directory came without .git
        return os.environ["TRDPO_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# MLflow draws a progress bar for every artifact download; a study reads dozens of small tables.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's INFO chatter ("Creating initial MLflow database tables...") to the log file, from the
# first call on (orchestrator.console).
capture_library_logs()


# MLflow refuses a param value longer than this (its documented limit) and more than this many
# params in one log_batch call.
MAX_PARAM_LENGTH = 6000
PARAMS_PER_BATCH = 100


def log_params(params: dict[str, Any], run_id: str | None = None, client: MlflowClient | None = None) -> None:
    """Every MLflow param trdpo logs goes through here, with one rule: the value's ``str()``, cut to
    MLflow's limit of :data:`MAX_PARAM_LENGTH` characters (only a long list, e.g. an eval file's
    policies, comes near it), logged in batches MLflow accepts. ``run_id``: the active run."""
    client = client or MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    entries = [mlflow.entities.Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
    for start in range(0, len(entries), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=entries[start : start + PARAMS_PER_BATCH])


class TrackingUnavailable(UserFacingError, RuntimeError):
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


def check_local_store(uri: str) -> None:
    """A SQLite store must be writable, with its directory (SQLite writes a journal beside it):
    said in one line before anything starts, not as a traceback from deep inside MLflow."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    directory = path.parent
    if not directory.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(f"tracking.tracking_uri: cannot create {directory} for the MLflow store ({exc.strerror})") from None
    if not os.access(directory, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        where = path if path.exists() and not os.access(path, os.W_OK) else directory
        raise TrackingUnavailable(f"tracking.tracking_uri: the MLflow store {path} is not writable ({where} is read-only)")


EXPERIMENT_KIND = "custom_model_development"  # the MLflow UI then opens on runs and charts, not its GenAI views


def configure_tracking(tracking: TrackingConfig) -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI.

    A new experiment in a SQLite store keeps its artifacts beside the store (``mlartifacts/``
    next to the .db file), not in ``./mlruns`` of whatever directory the command ran in."""
    uri = tracking.resolved_tracking_uri()
    check_tracking_server(uri)
    check_local_store(uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(tracking.experiment_name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(tracking.experiment_name, artifact_location=location,
                                     tags={"mlflow.experimentKind": EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process of the run
            pass
    elif experiment.tags.get("mlflow.experimentKind") is None:
        mlflow.MlflowClient(uri).set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    mlflow.set_experiment(tracking.experiment_name)
    return uri


def configure(config: ExperimentConfig) -> str:
    return configure_tracking(config.tracking)


@contextlib.contextmanager
def tracked_run(config: ExperimentConfig, run_name: str, tags: dict[str, str] | None = None,
                parent_run_id: str | None = None, run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open (or re-open, by ``run_id``) a run, log the resolved config, and always close it:
    FINISHED on success, KILLED on Ctrl-C, FAILED on any other error. A top-level run (a
    training, study or sweep of its own) also gets the log file of Ray's messages as ``logs/``."""
    configure(config)
    top_level = parent_run_id is None and mlflow.active_run() is None
    all_tags = {"trdpo.stage": config.training.stage, "trdpo.ref_update": config.training.ref_update,
                "git_commit": git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    previous_status = mlflow.get_run(run_id).info.status if run_id else None
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, tags=all_tags,
                           nested=mlflow.active_run() is not None)
    try:
        if run_id is None:
            log_params(config.flat_params(), run.info.run_id)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(config.to_yaml(), encoding="utf-8")
                mlflow.log_artifact(str(path))
        yield run
    except KeyboardInterrupt:
        _attach_log_file(top_level)
        _end_after_failure(previous_status, "KILLED", "interrupted")
        raise
    except BaseException as exc:
        _attach_log_file(top_level)
        shown = user_facing_cause(exc) or exc  # a user's mistake, not Ray's wrapper around it
        _end_after_failure(previous_status, "FAILED", f"{type(shown).__name__}: {str(shown)[:200]}")
        raise
    else:
        _attach_log_file(top_level)
        mlflow.end_run(status="FINISHED")


def _attach_log_file(top_level: bool) -> None:
    """The log file of Ray's messages (orchestrator.console), as it is now, as the active run's
    artifact ``logs/<file>``; a run that cannot get it still ends as it should."""
    from orchestrator.console import LOG

    path = LOG.written() if top_level else None
    if path is None:
        return
    try:
        mlflow.log_artifact(str(path), artifact_path="logs")
    except Exception as exc:  # noqa: BLE001 - the log is a convenience; the run's status is not
        print(f"[trdpo] the log file {path} could not be attached to the MLflow run: {exc}", flush=True)


def _end_after_failure(previous_status: str | None, status: str, what: str) -> None:
    """A run that had FINISHED keeps its status when a later attempt on it fails: its results
    stand. The attempt is recorded in a tag instead."""
    if previous_status == "FINISHED":
        mlflow.set_tag("trdpo.last_attempt", f"{status.lower()}: {what}")
        status = "FINISHED"
    mlflow.end_run(status=status)


def run_exists(config: ExperimentConfig, run_id: str) -> bool:
    """Whether ``run_id`` is a run of the configured tracking store (a run directory can outlive
    the store it was tracked in)."""
    return has_run(mlflow.MlflowClient(configure(config)), run_id, config.tracking.resolved_tracking_uri())


def has_run(client: "mlflow.MlflowClient", run_id: str, uri: str) -> bool:
    """Whether the store holds ``run_id``. Only the store's "does not exist" answer is False; any
    other failure raises :class:`TrackingUnavailable`, so that an outage never looks like a
    missing run (and a rerun never starts a second run beside the one it should continue)."""
    try:
        client.get_run(run_id)
        return True
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        first = " ".join(str(exc).split())[:300]
        raise TrackingUnavailable(f"tracking.tracking_uri: the MLflow store at {uri} failed to answer about run {run_id} "
                                  f"({first}); nothing was started: rerun when it answers") from None


def find_run(config: ExperimentConfig, run_name: str) -> mlflow.entities.Run | None:
    """The latest run with this name in the configured experiment (for resuming)."""
    configure(config)
    experiment = mlflow.get_experiment_by_name(config.tracking.experiment_name)
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0] if runs else None
