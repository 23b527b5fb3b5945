"""Shared fixtures: tiny experiment configs that train in seconds on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray Train's controller polls workers every ~2 s by default; tests want quick reports.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Every process of the suite (Ray workers, CLI children) shares one tokenized cache of its own, so
# the suite never writes into the user's ~/.cache and its trainings go through the cache as users' do.
if "TRDPO_TOKENIZED_CACHE" not in os.environ:
    import tempfile

    os.environ["TRDPO_TOKENIZED_CACHE"] = tempfile.mkdtemp(prefix="trdpo-test-tokenized-")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def free_port() -> int:
    """A port nobody listens on now (tests never assume a fixed one: other runs share the machine)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_overrides(root, premade_store: bool = True) -> list[str]:
    """The embedded demo shrunk to seconds, tracking and outputs under ``root``. Its MLflow store
    starts as a copy of an empty one (tests/mlflow_store.py); ``premade_store=False``: trdpo
    creates it, as on a user's first run."""
    from mlflow_store import sqlite_store

    store = Path(root) / "mlflow.db"
    tracking_uri = sqlite_store(store) if premade_store else f"sqlite:///{store}"
    return [
        "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_heads=2",
        "data.synthetic.num_pairs=160", "data.validation_fraction=0.1", "data.max_length=64",
        "training.per_device_batch_size=4", "training.max_steps=12", "training.tau=4",
        "training.eval_every=6", "training.checkpoint_every=6", "training.warmup_steps=0", "training.log_every=1",
        f"tracking.tracking_uri={tracking_uri}", f"tracking.output_dir={root}/runs",
        "tracking.experiment_name=tests",
    ]


def _factory(root):
    from orchestrator.config import load_experiment

    def make(*overrides: str):
        return load_experiment(None, tiny_overrides(root) + list(overrides))

    return make


@pytest.fixture
def tiny_cli():
    """``tiny_overrides`` for tests that run the CLI in a fresh process (``--set`` each one)."""
    return tiny_overrides


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: the tiny experiment, tracking into this test's tmp dir."""
    return _factory(tmp_path)


@pytest.fixture(scope="module")
def tiny_config_shared(tmp_path_factory):
    """The same factory for module-scoped fixtures (one tmp dir per module)."""
    return _factory(tmp_path_factory.mktemp("shared"))


BYSTANDER = """
import signal, sys, time, ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
signal.signal(signal.SIGTERM, lambda *_: (ray.shutdown(), sys.exit(0)))
print("up", flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture(scope="module")
def bystander_ray():
    """Another Ray instance on this machine (a notebook, a second trdpo): runs must not join it
    or be confused by it."""
    import subprocess
    import sys

    # Not our Ray's address or GCS port (exported while the shared Ray is up): its own cluster.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    process = subprocess.Popen([sys.executable, "-c", BYSTANDER], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "up"
    yield process
    process.terminate()
    process.wait(timeout=60)


class SharedRay:
    """One local Ray with exactly 2 CPUs (never one another process started on this machine) for
    every in-process Ray test of the session: started by the first module that asks for it, again
    after a module that needed one of its own (``stop``), shut down at the end of the session.
    While it is up, RAY_ADDRESS and RAY_GCS_SERVER_PORT name it in this process's environment:
    a test that starts another Ray in a subprocess leaves them out (see ``bystander_ray``)."""

    def ensure(self):
        import ray

        from orchestrator.ray_train import connect

        if not ray.is_initialized():
            connect(None, num_cpus=2)
        assert ray.cluster_resources().get("CPU") == 2.0, ray.cluster_resources()
        return ray

    def stop(self) -> None:
        import sys

        ray = sys.modules.get("ray")  # never imported: nothing to stop (and no second to spend importing it)
        if ray is not None and ray.is_initialized():
            from orchestrator.ray_train import disconnect

            disconnect()


@pytest.fixture(scope="session")
def shared_ray():
    shared = SharedRay()
    yield shared
    shared.stop()


@pytest.fixture(autouse=True, scope="module")
def _shared_ray_only_among_integration_tests(request, shared_ray):
    """Modules outside tests/integration never find the shared Ray up: unit tests check what
    happens without a Ray (``--address`` probing), end-to-end tests start clusters of their own."""
    if Path(request.node.path).resolve().relative_to(Path(__file__).parent).parts[0] != "integration":
        shared_ray.stop()


@pytest.fixture(scope="module")
def ray_2_cpus(shared_ray):
    """The session's local Ray (2 CPUs), up for this module's tests and left up after them."""
    return shared_ray.ensure()


@pytest.fixture
def inject_fault(monkeypatch):
    """``inject_fault(hook)``: every training this test starts after the call gives its workers
    ``hook`` as ``TrainSpec.after_step`` (``inject_fault(None)``: none again). ``hook`` is one of
    tests/fault_injection.py's faults, pickled by value so that Ray's workers need not import it."""
    from fault_injection import installer

    return installer(monkeypatch)


# Programs an in-process test may run through a library without being a process-starting test:
# MLflow and GitPython ask git for the source version of a run.
IN_PROCESS_HELPERS = {"git", "uname", "nvidia-smi", "ldconfig"}


@pytest.fixture(autouse=True)
def _process_starting_tests_are_marked_integration(request, monkeypatch):
    """A test left in `make test-fast` (not marked integration) that starts a process (torchrun,
    Ray, a server, any subprocess) fails, naming the program: mark it integration or keep it
    in-process. Ray's own start goes through subprocess too, so an unmarked ray.init is caught."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    import subprocess

    started: list[str] = []
    execute_child = subprocess.Popen._execute_child

    def record(popen, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes)) else list(args)
        program = os.path.basename(str(argv[0]).split()[0]) if argv else "?"
        if program not in IN_PROCESS_HELPERS:
            started.append(" ".join(map(str, argv))[:200])
        return execute_child(popen, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", record)
    yield
    if started:
        pytest.fail(f"{request.node.nodeid} starts a process but is not marked integration: {started[0]}", pytrace=False)
