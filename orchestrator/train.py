"""The ``train`` stage: one lifecycle for every runner (this process, or Ray Train workers).

    preflight     model source, data, writable storage: errors before any worker starts
    fingerprint   a rerun with the same name continues the run only if nothing that changes its
                  result changed; otherwise one line names the fields (--restart or a new name);
                  a finished run with the same fingerprint is not trained again
    tracked run   the MLflow run, re-opened when the run continues
    runner.fit    the workers resume from the newest complete checkpoint in the run's storage and
                  export the policy there (trainers.loop)
    result        <run storage>/result.json, the policy logged to MLflow

The run's storage is ``<tracking.output_dir>/<run name>`` (a path or an ``s3://``/``gs://`` URI):
``run.json`` (fingerprint, MLflow run), ``checkpoints/<attempt>/step_*``, ``policy/`` (the
export), ``result.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import mlflow

from orchestrator.config import ExperimentConfig
from orchestrator.progress import StepLogger
from orchestrator.tracking import run_exists, tracked_run
from trainers.state.checkpoint import checkpoint_steps
from trainers.data.loading import load_examples
from trainers.state.fingerprint import differences, fingerprint
from trainers.config import TrainSpec
from trainers.loop import CHECKPOINTS, POLICY, train
from trainers.model.build import check_model_source
from trainers.sessions import LocalSession
from trainers.state.storage import Storage
from trainers.errors import UserFacingError

RUN_FILE = "run.json"
RESULT_FILE = "result.json"


class RunConflict(UserFacingError, ValueError):
    """A rerun whose settings differ from the run it would continue."""


@dataclass
class TrainResult:
    run_id: str  # MLflow
    run_name: str
    metrics: dict
    model_dir: str  # the exported policy: a local directory or a storage URI
    run_uri: str  # the run's storage


def run_name_of(config: ExperimentConfig) -> str:
    t = config.training
    if config.tracking.run_name:
        return config.tracking.run_name
    rule = {"none": "dpo", "soft": f"soft-a{t.alpha}-t{t.tau}", "hard": f"hard-t{t.tau}"}[t.ref_update]
    return f"{config.name}-{t.stage if t.stage == 'sft' else rule}"


@dataclass(frozen=True)
class ResolvedRun:
    """One training, resolved once by the driver: its name, its storage and its fingerprint.
    Everything after (the MLflow run, the runner, Ray Train's storage, the workers' spec) receives
    this object instead of working them out again from the config."""

    config: ExperimentConfig
    name: str
    store: Storage
    fingerprint: dict = field(repr=False)

    @classmethod
    def of(cls, config: ExperimentConfig, store: Storage | None = None) -> "ResolvedRun":
        """The run ``config`` names, in ``store`` (default: ``<tracking.output_dir>/<run name>``;
        a sweep trial passes its own)."""
        name = run_name_of(config)
        return cls(config, name, store or Storage(config.tracking.output_dir).child(name),
                   fingerprint(config.model, config.tokenizer, config.data, config.training))

    @property
    def checkpoints(self) -> Storage:
        return self.store.child(CHECKPOINTS)

    def spec(self, mlflow_run_id: str | None = None) -> TrainSpec:
        """The workers' spec; with ``mlflow_run_id`` rank 0 logs every step's metrics to that run."""
        c = self.config
        logger = StepLogger(c.tracking.resolved_tracking_uri(), mlflow_run_id, self.name) if mlflow_run_id else None
        return TrainSpec(c.model, c.tokenizer, c.data, c.training, self.store.uri, step_logger=logger)


class Runner(Protocol):
    description: str

    def prepare(self, config: ExperimentConfig) -> None:
        """Checks that need the runner (cluster resources), before the MLflow run opens."""

    def fit(self, run: ResolvedRun, spec: TrainSpec) -> dict:
        """Train to the end (resuming as the loop decides); returns the final metrics."""


class LocalRunner:
    """The loop in this process: one worker, no FSDP (quickest for debugging)."""

    description = "local (single process)"

    def prepare(self, config: ExperimentConfig) -> None:
        pass

    def fit(self, run: ResolvedRun, spec: TrainSpec) -> dict:
        session = LocalSession(lambda metrics, saved: None, run.checkpoints, keep=run.config.training.keep_checkpoints)
        return train(spec, session)


def preflight(config: ExperimentConfig) -> None:
    """Errors that must surface before any worker starts: model paths, the data, the storage."""
    check_model_source(config.model)
    load_examples(config.data, "train")
    Storage(config.tracking.output_dir).check_writable()


def _read_json(store: Storage, name: str) -> dict | None:
    try:
        return json.loads(store.read_text(name))
    except FileNotFoundError:
        return None


def finished_result(store: Storage) -> TrainResult | None:
    """The result of a run that finished and exported its policy, else None."""
    record = _read_json(store, RESULT_FILE)
    if record is None or not store.exists(POLICY, "config.json"):
        return None
    return TrainResult(**record)


def run_training(config: ExperimentConfig, runner: Runner, parent_run_id: str | None = None,
                 restart: bool = False, tags: dict[str, str] | None = None) -> TrainResult:
    """Train ``config`` to its end, continuing or skipping by the fingerprint rule; ``tags`` go on
    its MLflow run (the study, variant and seed it belongs to)."""
    preflight(config)
    run = ResolvedRun.of(config)
    name, store, current = run.name, run.store, run.fingerprint
    if restart and store.exists():
        print(f"[trdpo] --restart: deleting run {name} ({store.uri}) and starting it over", flush=True)
        store.remove()
    record = _read_json(store, RUN_FILE)
    finished = finished_result(store)
    continuing = finished is not None or bool(checkpoint_steps(run.checkpoints))
    if record is not None and continuing and record["fingerprint"] != current:
        changed = differences(record["fingerprint"], current)
        raise RunConflict(f"run {name} exists with other settings: {', '.join(changed)}; rerun with --restart to "
                          f"start it over, or set tracking.run_name to keep both")
    if finished is not None and record is not None:
        print(f"[trdpo] run {name} already finished with these settings (MLflow run {finished.run_id}); "
              f"not training again (--restart to train it over)", flush=True)
        return finished
    if not continuing and store.exists():
        store.remove()  # a failed attempt that left no checkpoint: nothing to continue
    runner.prepare(config)

    reopen = record["mlflow_run_id"] if record and continuing and run_exists(config, record["mlflow_run_id"]) else None
    tags = {"trdpo.kind": "train", "ray_address": runner.description, "trdpo.num_workers": str(config.training.num_workers),
            "trdpo.run_storage": store.uri, **(tags or {})}
    with tracked_run(config, name, tags=tags, parent_run_id=parent_run_id, run_id=reopen) as tracked:
        mlflow_run_id = tracked.info.run_id
        store.write_text(json.dumps({"fingerprint": current, "mlflow_run_id": mlflow_run_id}, indent=1), RUN_FILE)
        if reopen:
            print(f"[trdpo] continuing run {name} (MLflow {mlflow_run_id}) from {store.uri}", flush=True)
        started = time.perf_counter()
        metrics = runner.fit(run, run.spec(mlflow_run_id))
        mlflow.log_metric("train/wall_time_s", time.perf_counter() - started)
        _log_policy(store)
        result = TrainResult(mlflow_run_id, name, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                             store.uri_of(POLICY), store.uri)
        store.write_text(json.dumps(asdict(result), indent=1), RESULT_FILE)
        return result


def _log_policy(store: Storage) -> None:
    if store.local:
        mlflow.log_artifacts(store.path(POLICY), artifact_path=POLICY)
        return
    with tempfile.TemporaryDirectory(prefix="trdpo-policy-") as tmp:
        mlflow.log_artifacts(str(store.get_dir(Path(tmp), POLICY)), artifact_path=POLICY)


def run_local(config: ExperimentConfig, parent_run_id: str | None = None, restart: bool = False,
              tags: dict[str, str] | None = None) -> TrainResult:
    return run_training(config, LocalRunner(), parent_run_id, restart, tags)


__all__ = ["LocalRunner", "ResolvedRun", "RunConflict", "TrainResult", "preflight", "run_local", "run_name_of", "run_training"]
