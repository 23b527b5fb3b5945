"""Runs that live in an object store: a real S3-compatible server (moto, on 127.0.0.1) holds the
checkpoints of a 2-worker training that is killed and resumes from them, its exported policy,
and, behind a real MLflow server with --artifacts-destination s3://..., its MLflow artifacts.
No shared disk is involved: every process reaches the store over HTTP. While the server is
stopped, a rerun fails in one line and deletes nothing; once it answers again, the rerun resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
BIN = Path(sys.executable).parent


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, shared_ray):
    """A moto S3 server with a bucket (``s3``: its ``endpoint`` and ``process``), a real MLflow
    server whose artifacts go to that bucket (``mlflow``: its URI), and a local Ray started after
    the AWS_* variables point every process at the S3 server, so that its workers inherit them
    (the session's shared Ray, started before, would not have them). The three start together:
    each server boots while the others do."""
    from orchestrator.ray_train import connect, disconnect

    s3_port, mlflow_port = _port(), _port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as sink:
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                                stdout=sink, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3_port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    root = tmp_path_factory.mktemp("mlflow-server")
    started = [moto]
    try:
        mlflow = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
                                   "--artifacts-destination", "s3://bucket/mlartifacts", "--host", "127.0.0.1",
                                   "--port", str(mlflow_port), "--workers", "1"],
                                  cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(mlflow)
        shared_ray.stop()
        connect(None, num_cpus=2)
        wait_until(lambda: urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).status == 200, 60, "moto")
        import boto3

        boto3.client("s3").create_bucket(Bucket="bucket")
        uri = f"http://127.0.0.1:{mlflow_port}"
        wait_until(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, 120, "mlflow server")
        yield SimpleNamespace(s3=SimpleNamespace(endpoint=endpoint, process=moto, log=log), mlflow=uri)
    finally:
        disconnect()
        for process in reversed(started):
            _stop(process)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_killed_two_worker_run_resumes_from_s3_and_exports_there(servers, tiny_config, monkeypatch, inject_fault, capfd):
    s3, mlflow_server = servers.s3, servers.mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from orchestrator.ray_train import run_on_ray
    from orchestrator.train import RUN_FILE
    from trainers.state.checkpoint import checkpoint_steps, read_checkpoint
    from fault_injection import KillOnce
    from trainers.loop import CHECKPOINTS
    from trainers.state.storage import Storage

    config = tiny_config("tracking.output_dir=s3://bucket/runs", f"tracking.tracking_uri={mlflow_server}",
                         "tracking.run_name=cloud", "training.num_workers=2", "training.max_steps=8", "training.eval_every=4",
                         "training.checkpoint_every=4")
    inject_fault(KillOnce(6, 1))
    with pytest.raises(Exception) as killed:
        run_on_ray(config)
    # A store that died would fail the run too; say so rather than blame the resume below.
    assert s3.process.poll() is None, (f"the S3 server exited ({s3.process.returncode}) during the first run "
                                       f"({killed.value!r}); its log ends: {s3.log.read_text()[-2000:]}")
    run_store = Storage("s3://bucket/runs/cloud")
    assert not run_store.local and run_store.exists("fault-injected-6-1")
    assert [step for step, _ in checkpoint_steps(run_store.child(CHECKPOINTS))] == [4]
    inject_fault(None)

    # The server stops (SIGSTOP: it keeps its data but answers nothing, so every request times
    # out). The rerun must stop in one line naming the store, within the deadline of one storage
    # call (2 transfer attempts x 3 requests x (1 s connect + 1 s read) = 12 s with this timeout),
    # and delete nothing: an HTTP client's read timeout starts only once the body is sent, which
    # this server never asks for, and an unreadable checkpoint is not a damaged one.
    from trainers.state.storage import StorageUnreachable

    monkeypatch.setenv("TRDPO_STORAGE_TIMEOUT_S", "1")
    s3.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnreachable) as raised:
            run_on_ray(config)
        waited = time.monotonic() - started
    finally:
        s3.process.send_signal(signal.SIGCONT)
    monkeypatch.delenv("TRDPO_STORAGE_TIMEOUT_S")
    message = str(raised.value)
    print(f"stopped store: failed after {waited:.1f} s: {message}")
    assert message.startswith("cannot write to s3://bucket/runs (") and "\n" not in message
    assert waited < 60  # bounded by the 12 s deadline
    assert [step for step, _ in checkpoint_steps(run_store.child(CHECKPOINTS))] == [4] and run_store.exists(RUN_FILE)
    capfd.readouterr()
    result = run_on_ray(config)
    said = capfd.readouterr().out
    assert "resuming from s3://bucket/runs/cloud/checkpoints/attempt-" in said and "/step_00000004 (step 4)" in said
    assert result.model_dir == "s3://bucket/runs/cloud/policy"
    from trainers.state.checkpoint import check_checkpoint

    checkpoints = run_store.child(CHECKPOINTS)
    listing = {name: check_checkpoint(checkpoints, name) for _, name in checkpoint_steps(checkpoints)}
    state = read_checkpoint(checkpoints)
    assert state["step"] == 8 and state["world_size"] == 2, (listing, checkpoints.fs.find(checkpoints.root))
    # The export in the bucket is a Hugging Face model equal to the final checkpoint's policy.
    local = run_store.get_dir(Path(str(os.environ.get("TMPDIR", "/tmp"))) / f"export-{os.getpid()}", "policy")
    exported = AutoModelForCausalLM.from_pretrained(local).state_dict()
    assert max((state["policy"][k] - exported[k]).abs().max().item() for k in state["policy"]) == 0.0
    # The MLflow server stored the run's artifacts in the bucket, not on its disk.
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    artifacts = Storage("s3://bucket/mlartifacts")
    stored = [p for p in artifacts.fs.find(artifacts.root) if result.run_id in p]
    assert any(p.endswith("policy/model.safetensors") for p in stored) and any(p.endswith("config.yaml") for p in stored)
    steps = [m.step for m in client.get_metric_history(result.run_id, "train/loss")]
    assert steps == list(range(1, 9))
