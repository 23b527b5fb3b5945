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
    _, alive = psutil.wait_procs(mine, timeout=15)
    for process in alive:
        process.kill()


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
                       "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db", "--set", f"tracking.output_dir={tmp_path}/runs")
    assert submitted.exit_code == 0, submitted.output
    long_job = submitted.output.strip().splitlines()[0]
    wait_until(lambda: invoke("status", long_job, "--address", ray_head).output.strip() == "RUNNING", 120, "RUNNING")
    assert "stop requested" in invoke("stop", long_job, "--address", ray_head).output
    wait_until(lambda: invoke("status", long_job, "--address", ray_head).output.strip() == "STOPPED", 120, "STOPPED")

    missing = CliRunner().invoke(main, ["status", "no-such-job", "--address", ray_head])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    unreachable = CliRunner().invoke(main, ["status", "x", "--address", f"http://127.0.0.1:{free_port()}"])
    assert unreachable.exit_code == 2 and "cannot reach the Ray Jobs API" in unreachable.output


def test_runs_are_visible_through_a_real_mlflow_server(tmp_path, tiny_config):
    port = free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, 90, "mlflow server")
        from orchestrator.train import run_local

        result = run_local(tiny_config(f"tracking.tracking_uri={uri}", "training.max_steps=4", "training.tau=2",
                                       "training.eval_every=2", "training.checkpoint_every=2"))
        with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tests", timeout=10) as r:
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
    finally:
        server.terminate()
        server.wait(timeout=30)
    down = CliRunner().invoke(main, ["train", "--no-ray", "--set", f"tracking.tracking_uri={uri}"])
    assert down.exit_code == 2 and "cannot reach the MLflow server" in down.output and "Traceback" not in down.output


def test_a_study_fails_while_its_tracking_server_is_down_and_continues_its_run_after(tmp_path, tiny_config):
    """Before, any error looking up the study's parent run started a new one: with the server
    down, MLflow's client retried for ~4 minutes, and a server back by then got a second study
    run (or the same one, by luck). Now the rerun fails at once, in one line, changing nothing;
    with the server back it continues the same study run."""
    import threading

    from mlflow.tracking import MlflowClient

    from orchestrator.pipeline import run_pipeline
    from orchestrator.tracking import TrackingUnavailable

    port = free_port()
    uri = f"http://127.0.0.1:{port}"

    def start():
        return subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def healthy():
        return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200

    config = tiny_config(f"tracking.tracking_uri={uri}", "pipeline.sft.enabled=false", "pipeline.variants=[]",
                         "pipeline.dpo_variant=null", "pipeline.seeds=null", "evaluation.enabled=false", "training.max_steps=2", "training.tau=2",
                         "training.eval_every=2", "training.checkpoint_every=2")
    servers, comeback = [start()], None
    try:
        wait_until(healthy, 90, "mlflow server")
        first = run_pipeline(config, use_ray=False)
        servers[0].terminate()
        servers[0].wait(timeout=30)
        state = Path(config.tracking.output_dir) / config.name / "pipeline_state.json"
        recorded = state.read_text()
        # The server comes back a few seconds later, as after a restart or a network blip.
        comeback = threading.Timer(5.0, lambda: servers.append(start()))
        comeback.start()
        with pytest.raises(TrackingUnavailable, match=f"cannot reach the MLflow server at {uri}"):
            run_pipeline(config, use_ray=False)
        assert comeback.is_alive() and state.read_text() == recorded  # failed before it came back, and changed nothing
        comeback.join()
        wait_until(healthy, 90, "mlflow server, restarted")
        again = run_pipeline(config, use_ray=False)
        assert again["parent_run_id"] == first["parent_run_id"]
        client = MlflowClient(uri)
        studies = client.search_runs([client.get_experiment_by_name("tests").experiment_id], "tags.`trdpo.kind` = 'experiment'")
        assert [r.info.run_id for r in studies] == [first["parent_run_id"]]
    finally:
        if comeback is not None:
            comeback.cancel()
            comeback.join()
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


CONNECT_WITH_A_DEAD_RECORD = """
import os, sys, time
os.environ["RAY_ADDRESS"] = sys.argv[1]  # what a dead, recorded cluster looks like to ray.init()
started = time.time()
from orchestrator.ray_train import connect, disconnect
import ray
print("where", connect(None, num_cpus=1), ray.cluster_resources().get("CPU"), round(time.time() - started), flush=True)
disconnect()
"""


def test_without_address_trdpo_starts_its_own_ray_and_a_dead_address_fails_in_seconds(tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    started = time.time()
    out = subprocess.run([sys.executable, "-c", CONNECT_WITH_A_DEAD_RECORD, dead], capture_output=True, text=True,
                         timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "where local 1.0" in out.stdout  # a local Ray of its own, not a retry loop on the dead one
    started = time.time()
    refused = CliRunner().invoke(main, ["train", "--address", dead, "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
                                        "--set", f"tracking.output_dir={tmp_path}/runs"])
    assert refused.exit_code == 2 and f"--address {dead}: no Ray cluster answers there" in refused.output
    assert time.time() - started < 30


def test_ctrl_c_says_how_to_resume_and_ends_the_run_killed(tmp_path):
    import signal
    import sqlite3

    db = tmp_path / "m.db"
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", "--set", f"tracking.tracking_uri=sqlite:///{db}",
           "--set", f"tracking.output_dir={tmp_path}/runs", "--set", "training.max_steps=100000",
           "--set", "training.log_every=1", "--set", "training.checkpoint_every=50"]
    process = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"})

    def steps_logged() -> int:
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from metrics where key = 'train/loss'").fetchone()[0]

    wait_until(lambda: process.poll() is None and steps_logged() >= 2, 240, "training steps")
    process.send_signal(signal.SIGINT)
    interrupted = time.time()
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output[-3000:]
    assert "interrupted; rerun the same command to resume" in output and "Traceback" not in output
    assert time.time() - interrupted < 60
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("trdpo-demo").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
