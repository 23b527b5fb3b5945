"""The ``train`` stage on Ray Train V2: a TorchTrainer of ``trainers.loop.ray_train_worker``.

    driver (this process) ── opens the MLflow run, checks resources, fits the TorchTrainer
      └─ N workers        ── trainers.loop.train under FSDP2; rank 0 logs each step's metrics
                             (already reduced over ranks) to the MLflow run and attaches checkpoints

Re-running with the same run name resumes: Ray restores the run from its storage snapshot
(``RunConfig(name, storage_path)``) and the same MLflow run is re-opened. A worker that dies is
replaced and the group restarts from the last checkpoint (``training.max_failures``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
import ray
import ray.train
from ray.train.torch import TorchTrainer

from orchestrator.config import ExperimentConfig
from orchestrator.tracking import find_run, tracked_run
from orchestrator.train import TrainResult, preflight, run_name_of, spec_of
from trainers.loop import export_policy, ray_train_worker


class ClusterError(RuntimeError):
    """The cluster cannot run this configuration (said before any worker starts)."""


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """A refused or silent host:port fails here in seconds, not after Ray's long connect retries."""
    import socket
    from urllib.parse import urlparse

    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if not parsed.hostname or not parsed.port:
        raise ClusterError(f"--address {address}: expected host:port, ray://host:port or 'auto'")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def connect(address: str | None, num_cpus: int | None = None) -> str:
    """Join ``address`` or start a local Ray for this run; returns a description for tags."""
    if ray.is_initialized():
        return "existing connection"
    if address:
        probe_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"--address {address}: cannot connect to Ray ({exc})") from None
        return address
    # Train V2 paces each report by its health-check poll (2 s by default). Reports happen only at
    # validation and checkpoint steps, so 0.5 s keeps them quick without the poll eating a core.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Train V2 routes workers' print() through a logger *and* the console: every line twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # The dashboard stays on: Train's placement-group cleaner needs the state API to free the
    # resources of stopped runs.
    ray.init(num_cpus=num_cpus, log_to_driver=True)
    return "local"


def check_resources(config: ExperimentConfig) -> None:
    t = config.training
    need_cpu = t.num_workers * t.resources_per_worker.CPU
    need_gpu = t.num_workers * t.resources_per_worker.GPU
    have = ray.cluster_resources()
    if need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0):
        raise ClusterError(
            f"training.num_workers: {t.num_workers} workers x {t.resources_per_worker.CPU:g} CPU / "
            f"{t.resources_per_worker.GPU:g} GPU need {need_cpu:g} CPU and {need_gpu:g} GPU, "
            f"but the cluster has {have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU"
        )


def make_trainer(config: ExperimentConfig, run_dir: Path, mlflow_run_id: str, train_run_name: str, storage: Path,
                 callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer for one training: workers, resources, checkpoints kept, restarts allowed.
    ``train_run_name`` + ``storage`` identify the Train run: the same pair resumes it."""
    t = config.training
    return TorchTrainer(
        ray_train_worker,
        train_loop_config={"spec": spec_of(config, run_dir, mlflow_run_id)},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.resources_per_worker.GPU > 0,
                                               resources_per_worker=t.resources_per_worker.model_dump()),
        run_config=ray.train.RunConfig(
            name=train_run_name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or [],
        ),
    )


def run_on_ray(config: ExperimentConfig, address: str | None = None, parent_run_id: str | None = None) -> TrainResult:
    preflight(config)
    where = connect(address)
    check_resources(config)
    t = config.training
    name = run_name_of(config)
    run_dir = Path(config.tracking.output_dir).resolve() / name
    storage = run_dir.parent / "ray"
    resuming = (storage / name).exists()
    previous = find_run(config, name) if resuming else None
    with tracked_run(config, name, tags={"ray_address": where, "trdpo.num_workers": str(t.num_workers)},
                     parent_run_id=parent_run_id, run_id=previous.info.run_id if previous else None) as run:
        if previous:
            print(f"[trdpo] resuming run {name} ({run.info.run_id}) from {storage / name}", flush=True)
        trainer = make_trainer(config, run_dir, run.info.run_id, train_run_name=name, storage=storage)
        started = time.perf_counter()
        result = trainer.fit()
        mlflow.log_metric("train/wall_time_s", time.perf_counter() - started)
        checkpoint_dir = Path(result.checkpoint.path)
        model_dir = export_policy(checkpoint_dir, spec_of(config, run_dir), run_dir / "policy")
        mlflow.log_artifacts(str(model_dir), artifact_path="policy")
        return TrainResult(run.info.run_id, name, dict(result.metrics or {}), model_dir, checkpoint_dir)
