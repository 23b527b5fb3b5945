"""Against real servers: a Ray head started with `ray start --head` (Jobs API: submit, status,
logs, stop) and an `mlflow server` on loopback (runs visible through its REST API)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from mlflow_store import sqlite_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(autouse=True, scope="module")
def _no_ray_in_this_process(shared_ray):
    """The CLI runs in this process here: with the session's shared Ray up it would train on it
    ("existing connection") instead of trying the --address it is given."""
    shared_ray.stop()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    dashboard = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    temp_dir = tmp_path_factory.mktemp("rayhead")
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={free_port()}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--include-dashboard=true", f"--temp-dir={temp_dir}"],
                   check=True, env=env, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        from orchestrator.submit import client

        wait_until(lambda: client(address), 60, "the Jobs API")
        yield address
    finally:
        stop_processes_of(temp_dir)


def stop_processes_of(temp_dir: Path) -> None:
    """Stop the Ray this test started, and only it: every process whose command line names its
    temp dir (``ray stop`` would kill every Ray on the machine, other users' included)."""
    import psutil

    mine = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in process.info["cmdline"] or []):
                mine.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for process in mine:
        process.terminate()
    # gcs_server, raylet and the autoscaler monitor outlive a SIGTERM for longer than any test
    # should wait (measured: still up after 15 s); what is left after a short grace is killed.
    _, alive = psutil.wait_procs(mine, timeout=3)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=15)


class MlflowServer:
    """An ``mlflow server`` on loopback, stopped and started again on the same port and store (as
    after a restart): one for the module, since each start costs 10-17 s here."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        # A session of its own: stop() ends the server and its workers together.
        process = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root}/server.db",
                                    "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                                   cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        return process

    def healthy(self) -> bool:
        return urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200

    def wait_healthy(self, what: str = "mlflow server") -> None:
        wait_until(self.healthy, 90, what)

    def stop(self) -> None:
        """Down at once, workers included (a graceful stop takes ~5 s and nothing here needs it)."""
        import signal

        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """The module's MLflow server, up when a test starts (each test tracks into an experiment of
    its own, so no test sees another's runs)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server_up(mlflow_server):
    try:
        up = mlflow_server.healthy()
    except OSError:
        up = False
    if not up:
        mlflow_server.start()
        mlflow_server.wait_healthy()
    return mlflow_server


def sigint_default() -> None:
    """In a child about to be interrupted: SIGINT as a terminal's Ctrl-C delivers it, also when the
    tests run where it is ignored (a shell's background job), which the child would inherit."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_submit_status_logs_stop_against_a_real_head(ray_head, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the shipped working directory is the repository
    from orchestrator.submit import submit

    quick = submit(["validate", "orchestrator/defaults/demo.yaml", "tune_configs/smoke.yaml"], ray_head)
    wait_until(lambda: invoke("status", quick, "--address", ray_head).output.strip() in {"SUCCEEDED", "FAILED"}, 180, "the job")
    assert invoke("status", quick, "--address", ray_head).output.strip() == "SUCCEEDED"
    logs = invoke("logs", quick, "--address", ray_head).output
    assert "orchestrator/defaults/demo.yaml: ok (trdpo" in logs and "tune_configs/smoke.yaml: ok (sweep" in logs

    submitted = invoke("run", "--submit", "--address", ray_head, "--set", "training.max_steps=100000",
                       "--set", f"tracking.tracking_uri={sqlite_store(tmp_path / 'm.db')}", "--set", f"tracking.output_dir={tmp_path}/runs")
    assert submitted.exit_code == 0, submitted.output
    long_job = submitted.output.strip().splitlines()[0]
    wait_until(lambda: invoke("status", long_job, "--address", ray_head).output.strip() == "RUNNING", 120, "RUNNING")
    assert "stop requested" in invoke("stop", long_job, "--address", ray_head).output
    wait_until(lambda: invoke("status", long_job, "--address", ray_head).output.strip() == "STOPPED", 120, "STOPPED")

    missing = CliRunner().invoke(main, ["status", "no-such-job", "--address", ray_head])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    unreachable = CliRunner().invoke(main, ["status", "x", "--address", f"http://127.0.0.1:{free_port()}"])
    assert unreachable.exit_code == 2 and "cannot reach the Ray Jobs API" in unreachable.output


def test_runs_are_visible_through_a_real_mlflow_server(mlflow_server_up, tiny_config):
    """(What a run does while the server is down is the next test's: it stops the server anyway.)"""
    uri = mlflow_server_up.uri
    from orchestrator.train import run_local

    result = run_local(tiny_config(f"tracking.tracking_uri={uri}", "tracking.experiment_name=visible", "training.max_steps=4",
                                   "training.tau=2", "training.eval_every=2", "training.checkpoint_every=2"))
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=visible", timeout=10) as r:
        experiment_id = json.load(r)["experiment"]["experiment_id"]
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        runs = json.load(r)["runs"]
    assert [run["info"]["run_id"] for run in runs] == [result.run_id]
    assert runs[0]["info"]["status"] == "FINISHED"
    assert any(m["key"] == "val/rewards/accuracy" for m in runs[0]["data"]["metrics"])
    shown = CliRunner().invoke(main, ["ui", "--set", f"tracking.tracking_uri={uri}"])
    assert shown.exit_code == 0 and f"open {uri}" in shown.output


def test_a_study_fails_while_its_tracking_server_is_down_and_continues_its_run_after(mlflow_server_up, tiny_config):
    """With the server down, the rerun fails at once, in one line, changing nothing; with the
    server back it continues the same study run. (An error looking up the parent run must not
    start a new one: MLflow's client retries for ~4 minutes, and a server back by then would get
    a second study run.) A training against the server while it is down fails in one line too."""
    import threading

    from mlflow.tracking import MlflowClient

    from orchestrator.pipeline import run_pipeline
    from orchestrator.tracking import TrackingUnavailable

    server, uri = mlflow_server_up, mlflow_server_up.uri
    config = tiny_config(f"tracking.tracking_uri={uri}", "tracking.experiment_name=study-restart", "pipeline.sft.enabled=false",
                         "pipeline.variants=[]", "pipeline.dpo_variant=null", "pipeline.seeds=null", "evaluation.enabled=false",
                         "training.max_steps=2", "training.tau=2", "training.eval_every=2", "training.checkpoint_every=2")
    comeback = None
    try:
        first = run_pipeline(config, use_ray=False)
        server.stop()
        down = CliRunner().invoke(main, ["train", "--no-ray", "--set", f"tracking.tracking_uri={uri}"])
        assert down.exit_code == 2 and "cannot reach the MLflow server" in down.output and "Traceback" not in down.output
        state = Path(config.tracking.output_dir) / config.name / "pipeline_state.json"
        recorded = state.read_text()
        # The server comes back a few seconds later, as after a restart or a network blip.
        comeback = threading.Timer(5.0, server.start)
        comeback.start()
        with pytest.raises(TrackingUnavailable, match=f"cannot reach the MLflow server at {uri}"):
            run_pipeline(config, use_ray=False)
        assert comeback.is_alive() and state.read_text() == recorded  # failed before it came back, and changed nothing
        comeback.join()
        server.wait_healthy("mlflow server, restarted")
        again = run_pipeline(config, use_ray=False)
        assert again["parent_run_id"] == first["parent_run_id"]
        client = MlflowClient(uri)
        studies = client.search_runs([client.get_experiment_by_name("study-restart").experiment_id], "tags.`trdpo.kind` = 'experiment'")
        assert [r.info.run_id for r in studies] == [first["parent_run_id"]]
    finally:
        if comeback is not None:
            comeback.cancel()
            comeback.join()


def test_a_dead_address_fails_in_seconds(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    started = time.time()
    refused = CliRunner().invoke(main, ["train", "--address", dead, "--set", f"tracking.tracking_uri={sqlite_store(tmp_path / 'm.db')}",
                                        "--set", f"tracking.output_dir={tmp_path}/runs"])
    assert refused.exit_code == 2 and f"--address {dead}: no Ray cluster answers there" in refused.output
    assert time.time() - started < 30


def test_without_address_trdpo_starts_its_own_ray_and_ctrl_c_says_how_to_resume_and_ends_the_run_killed(tmp_path, tiny_cli):
    """`trdpo train` with no --address, where RAY_ADDRESS names a dead cluster (what a cluster
    recorded long ago looks like to ray.init()): it trains on a local Ray of its own, not a retry
    loop on the dead one; Ctrl-C then ends it at once, saying how to resume, the run KILLED."""
    import signal
    import sqlite3

    db = tmp_path / "mlflow.db"  # where tiny_cli tracks
    dead = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "train"]
    for override in tiny_cli(tmp_path) + ["training.max_steps=100000", "training.log_every=1", "training.checkpoint_every=50"]:
        cmd += ["--set", override]
    process = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=sigint_default,
                               env={**os.environ, "RAY_ADDRESS": dead, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"})

    def steps_logged() -> int:
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from metrics where key = 'train/loss'").fetchone()[0]

    try:
        wait_until(lambda: process.poll() is None and steps_logged() >= 2, 240, "training steps")
        process.send_signal(signal.SIGINT)
        interrupted = time.time()
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:  # failed on the way: stop the training and its Ray, not leave them running
            process.terminate()
            process.wait(timeout=60)
    assert process.returncode == 130, output[-3000:]
    assert "interrupted; rerun the same command to resume" in output and "Traceback" not in output
    assert time.time() - interrupted < 60
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert runs[0].data.tags["ray_address"] == "local"  # a Ray of its own, started for this run
