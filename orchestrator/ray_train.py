"""The ``train`` stage on Ray Train V2: a TorchTrainer of ``trainers.loop.ray_train_worker``.

    driver (this process) ── the lifecycle of orchestrator.train (fingerprint, MLflow run, result)
      └─ N workers        ── trainers.loop.train under FSDP2; rank 0 logs each step's metrics
                             (already reduced over ranks) to the MLflow run; every rank reports its
                             checkpoint shards, which Ray merges into the run's storage

The run's ``checkpoints/`` (local path or object-store URI) is Ray Train's ``storage_path``, each
launch a new Ray Train run in it; checkpoints land in ``<run>/checkpoints/<attempt>/step_*``. A worker that dies is
replaced and the group restarts from the newest complete checkpoint (``training.max_failures``);
a user's mistake raised on a worker is never retried.

Which Ray: ``--address`` joins that cluster (probed first, so a dead one fails in seconds); a
submitted job joins the cluster that runs it; otherwise trdpo always starts its own local Ray for
the run, never the last ``ray start`` cluster recorded on the machine. Every process of the run (Train's controller, its placement-group
cleaner, Tune trials) finds this cluster through ``RAY_ADDRESS``, so another Ray instance on the
same machine cannot confuse them.
"""

from __future__ import annotations

import os
import socket

import ray
import ray.train

from orchestrator.compat import off_main_thread
from orchestrator.config import ExperimentConfig
from orchestrator.ray_trainer import DPOTrainer
from orchestrator.train import ResolvedRun, TrainResult, run_training
from trainers.state.checkpoint import new_attempt
from trainers.entrypoints import ray_train_worker
from trainers.config import TrainSpec
from trainers.process_group import free_port
from trainers.errors import UserFacingError


class ClusterError(UserFacingError, RuntimeError):
    """The cluster cannot run this configuration (said before any worker starts)."""


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """A refused or silent host:port fails here in seconds, not after Ray's long connect retries."""
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


_STARTED_ENV: dict[str, str | None] = {}


def job_cluster() -> str | None:
    """The cluster that runs this process as a Ray job's entrypoint (``trdpo submit``): Ray's job
    supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR and points RAY_ADDRESS at its cluster. Anywhere
    else RAY_ADDRESS is not followed (it may name a dead cluster recorded long ago)."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    return None


def connect(address: str | None, num_cpus: int | None = None) -> str:
    """Join ``address`` (inside a submitted job: the job's cluster) or start a local Ray for this
    run; returns a description for tags."""
    if ray.is_initialized():
        return "existing connection"
    from ray.util import get_node_ip_address

    from orchestrator import console
    from orchestrator.compat import RAY_TRAIN_ENV

    console.before_ray_init()  # Ray's chatter to the log file, trdpo's lines to the console
    address = address or job_cluster()
    if address:
        probe_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"--address {address}: cannot connect to Ray ({exc})") from None
        console.announce(None)
        return address
    port = free_port()
    env = {
        # The GCS port is chosen here, so that the address is known before the cluster starts and
        # every process Ray spawns inherits RAY_ADDRESS (Train's placement-group cleaner otherwise
        # looks for "the" local cluster and dies when it finds two).
        "RAY_GCS_SERVER_PORT": str(port),
        "RAY_ADDRESS": f"{get_node_ip_address()}:{port}",
        **{name: os.environ.get(name, value) for name, value in RAY_TRAIN_ENV.values()},
    }
    for key, value in env.items():
        _STARTED_ENV.setdefault(key, os.environ.get(key))
        os.environ[key] = value
    # address="local": a new cluster, whatever `ray start` recorded on this machine. The dashboard
    # stays on: Train's placement-group cleaner needs the state API to free stopped runs.
    context = ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, dashboard_port=free_port())
    console.announce(os.path.join(context.address_info["session_dir"], "logs"))
    return "local"


def disconnect() -> None:
    """Shut down the Ray this process started and restore the environment it changed."""
    ray.shutdown()
    for key, value in _STARTED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _STARTED_ENV.clear()


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


def make_trainer(run: ResolvedRun, spec: TrainSpec, callbacks: list | None = None) -> DPOTrainer:
    """The TorchTrainer for one launch of a training: workers, resources, restarts allowed.

    Ray Train's storage is the run's ``checkpoints/``, its run name a fresh attempt: Ray never
    restores (or deletes) an earlier attempt's checkpoints; the loop resumes from the newest
    complete one of any attempt and keeps the newest ``keep_checkpoints`` itself."""
    t = run.config.training
    filesystem, path = run.checkpoints.pyarrow()
    return DPOTrainer(
        ray_train_worker,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.resources_per_worker.GPU > 0,
                                               resources_per_worker=t.resources_per_worker.model_dump()),
        run_config=ray.train.RunConfig(
            name=new_attempt(), storage_path=path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or [],
        ),
    )


class RayRunner:
    """Ray Train workers (FSDP2 over ``training.num_workers`` ranks) on a local Ray or a cluster."""

    def __init__(self, address: str | None = None):
        self.address, self.description = address, address or "local"

    def prepare(self, config: ExperimentConfig) -> None:
        self.description = connect(self.address)
        check_resources(config)

    def fit(self, run: ResolvedRun, spec: TrainSpec) -> dict:
        result = off_main_thread(make_trainer(run, spec).fit)
        return dict(result.metrics or {})


def run_on_ray(config: ExperimentConfig, address: str | None = None, parent_run_id: str | None = None,
               restart: bool = False, tags: dict[str, str] | None = None) -> TrainResult:
    return run_training(config, RayRunner(address), parent_run_id, restart, tags)
