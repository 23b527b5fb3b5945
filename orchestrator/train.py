"""The ``train`` stage: build the worker spec, run the loop, track it in MLflow, export the policy.

``run_local`` runs the loop in this process (one worker, no FSDP): the quickest path for debugging.
``orchestrator.ray_train.run_on_ray`` runs the same loop on Ray Train workers.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from orchestrator.config import ExperimentConfig
from orchestrator.tracking import StepLogger, find_run, tracked_run
from trainers.data import load_examples
from trainers.loop import LocalSession, TrainSpec, export_policy, train
from trainers.models import check_model_source


@dataclass
class TrainResult:
    run_id: str
    run_name: str
    metrics: dict
    model_dir: Path
    checkpoint_dir: Path | None


def spec_of(config: ExperimentConfig, run_dir: Path, mlflow_run_id: str | None = None) -> TrainSpec:
    """The workers' spec; with ``mlflow_run_id`` rank 0 logs every step's metrics to that run."""
    logger = StepLogger(config.tracking.resolved_tracking_uri(), mlflow_run_id, run_name_of(config)) if mlflow_run_id else None
    return TrainSpec(config.model, config.tokenizer, config.data, config.training, str(run_dir),
                     fault_injection=os.environ.get("TRDPO_FAULT_KILL"), step_logger=logger)


def run_name_of(config: ExperimentConfig) -> str:
    t = config.training
    if config.tracking.run_name:
        return config.tracking.run_name
    rule = {"none": "dpo", "soft": f"soft-a{t.alpha}-t{t.tau}", "hard": f"hard-t{t.tau}"}[t.ref_update]
    return f"{config.name}-{t.stage if t.stage == 'sft' else rule}"


def preflight(config: ExperimentConfig) -> None:
    """Errors that must surface before any worker starts: model paths and the data itself."""
    check_model_source(config.model)
    load_examples(config.data, "train")


def run_local(config: ExperimentConfig, parent_run_id: str | None = None) -> TrainResult:
    preflight(config)
    name = run_name_of(config)
    run_dir = Path(config.tracking.output_dir).resolve() / name
    checkpoints = run_dir / "checkpoints"
    previous = find_run(config, name) if checkpoints.exists() else None
    resuming = previous is not None and any(checkpoints.glob("step_*"))
    last: dict = {}

    with tracked_run(config, name, tags={"ray_address": "local (single process)"}, parent_run_id=parent_run_id,
                     run_id=previous.info.run_id if resuming else None) as run:
        if resuming:
            print(f"[trdpo] resuming run {name} ({run.info.run_id}) from {checkpoints}", flush=True)

        def on_report(metrics: dict, saved: Path | None) -> None:
            last.update(metrics)

        session = LocalSession(on_report, checkpoints, keep=config.training.keep_checkpoints)
        started = time.perf_counter()
        train(spec_of(config, run_dir, run.info.run_id), session)
        mlflow.log_metric("train/wall_time_s", time.perf_counter() - started)
        final_checkpoint = session.checkpoints[-1] if session.checkpoints else None
        model_dir = export_policy(final_checkpoint, spec_of(config, run_dir), run_dir / "policy")
        mlflow.log_artifacts(str(model_dir), artifact_path="policy")
        return TrainResult(run.info.run_id, name, last, model_dir, final_checkpoint)


__all__ = ["TrainResult", "preflight", "run_local", "run_name_of", "spec_of"]
