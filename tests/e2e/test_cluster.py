"""The cluster users run, end to end on this host (e2e_cluster.py starts it from docker/compose.yaml's
own commands): two Ray nodes with token auth, MLflow on PostgreSQL with artifacts in S3, outputs in
S3. A study submitted from the host and rebuilt from the server alone, browsed in Chromium; a sweep
spread over both nodes; a node lost mid-training, rejoining, and the run ending as an
uninterrupted one. The tests share one cluster and run in this order (the last one replaces the
worker node)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from e2e_cluster import BUCKET, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]

TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_heads=2",
        "data.synthetic.num_pairs=160", "data.validation_fraction=0.1", "data.max_length=64",
        "training.per_device_batch_size=4", "training.warmup_steps=0", "training.log_every=1"]
STUDY = [*TINY, "name=e2e", "tracking.experiment_name=e2e-study", "training.num_workers=2",
         "training.max_steps=8", "training.tau=4", "training.eval_every=4", "training.checkpoint_every=4",
         "training.learning_rate=0.003", "pipeline.sft.overrides={training.max_steps: 4, training.learning_rate: 0.003}",
         "pipeline.variants=[{name: dpo, overrides: {training.ref_update: none, training.alpha: null, training.tau: null}},"
         " {name: soft, overrides: {training.ref_update: soft, training.alpha: 0.6, training.tau: 4}}]",
         "pipeline.seeds=[0]", "evaluation.checkpoints=4", "evaluation.num_prompts=4", "evaluation.sampling.num_samples=2",
         "evaluation.sampling.max_new_tokens=12", "evaluation.num_generation_actors=1", "evaluation.bootstrap_resamples=200"]
# A hard-update run long enough to lose a node in (~5 steps/s here): checkpoints every 12 of 48 steps.
LONG = [*TINY, "tracking.experiment_name=e2e-node-loss", "training.num_workers=2", "training.max_failures=2",
        "training.ref_update=hard", "training.alpha=null", "training.tau=8", "training.max_steps=48",
        "training.eval_every=24", "training.checkpoint_every=12"]


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def submit(cluster, *args: str, checkout: Path = REPO) -> str:
    """`trdpo ARGS --address HEAD` on the host, in a checkout (which is shipped); returns the job
    id. `trdpo train` has no --submit: it goes through the API that `trdpo submit` uses."""
    if args[0] == "train":
        code = "import sys; from orchestrator.submit import submit; print(submit(sys.argv[2:], sys.argv[1]))"
        submitted = subprocess.run([sys.executable, "-c", code, cluster.dashboard, *args], cwd=checkout,
                                   env=cluster.host_env, capture_output=True, text=True, timeout=120)
    else:
        submitted = cluster.trdpo(*args, "--address", cluster.dashboard, cwd=checkout)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    return submitted.stdout.strip().splitlines()[0]


def wait_for_job(cluster, job_id: str, timeout_s: float) -> str:
    started = time.time()
    final = wait_until(lambda: (s := cluster.job(job_id)["status"]) in {"SUCCEEDED", "FAILED", "STOPPED"} and s,
                       timeout_s, f"job {job_id}", every_s=1)
    output = cluster.job_logs(job_id)
    print(f"[e2e] job {job_id}: {final} after {time.time() - started:.0f} s of waiting", file=sys.stderr)
    keep = os.environ.get("TRDPO_E2E_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / f"{job_id}.log").write_text(output)
    assert final == "SUCCEEDED", f"{cluster.job(job_id).get('message')}\n{output[-6000:]}"
    return output


def train_worker_nodes(cluster, job_id: str, actor_class: str = "RayTrainWorker") -> dict[str, str]:
    """Actor id -> node id, for every actor of ``actor_class`` the job started (by default the Ray
    Train workers; ``ImplicitFunc`` is Tune's process for a trial function)."""
    ray_job = cluster.job(job_id)["job_id"]
    actors = cluster.state("actors", class_name=actor_class)
    return {a["actor_id"]: a["node_id"] for a in actors if a["job_id"] == ray_job}


def runs_of(client: MlflowClient, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


def test_the_compose_commands_form_a_two_node_cluster_that_wants_the_token(cluster):
    nodes = cluster.state("nodes", state="ALIVE")
    assert len(nodes) == 2 and {n["is_head_node"] for n in nodes} == {True, False}
    assert all(n["resources_total"]["CPU"] == 1.0 for n in nodes)
    # Token auth is on end to end: without the token, or with another, the head refuses.
    for headers in ({}, {"Authorization": "Bearer " + "0" * 64}):
        request = urllib.request.Request(f"{cluster.dashboard}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (401, 403)
    assert isinstance(cluster.api("/api/jobs/"), list)
    # MLflow's store is the PostgreSQL database of the compose file.
    import psycopg

    with psycopg.connect(cluster.database_uri) as connection, connection.cursor() as cursor:
        cursor.execute("select count(*) from experiments")
        assert cursor.fetchone()[0] >= 1  # MLflow's Default experiment, made by its migrations


def test_a_study_submitted_from_the_host_is_rebuilt_from_the_server_alone(cluster, tmp_path):
    # Submitted from a checkout of its own (a package of its own on the cluster: deleting Ray's
    # copies of it below touches no other job's).
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache",
                                                                  "trdpo_runs", "mlruns", "mlartifacts", "*.db", "report-*"))
    (checkout / "SUBMITTED_FROM").write_text(str(tmp_path))
    job_id = submit(cluster, "run", "--submit", *sets(STUDY), checkout=checkout)
    output = wait_for_job(cluster, job_id, 420)
    parent_id = re.search(r"done: experiment run (\w+)", output).group(1)

    # Its 2-worker trainings ran on the cluster, one worker per node (both nodes share one IP:
    # Ray Train's node_rank is 0 for both, so placement is checked by node id).
    placed = train_worker_nodes(cluster, job_id)
    assert len(placed) == 2 * 3 and set(placed.values()) == set(cluster.alive_nodes())

    client = MlflowClient(cluster.tracking_uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["trdpo.kind"] == "experiment"
    runs = runs_of(client, "e2e-study")
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert {"e2e-sft", "e2e-dpo", "e2e-soft", "e2e-vs-sft", "e2e-vs-dpo"} <= children, children
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    # Every run is a row of PostgreSQL; every artifact an object in the bucket.
    import psycopg

    with psycopg.connect(cluster.database_uri) as connection, connection.cursor() as cursor:
        cursor.execute("select r.run_uuid, r.status from runs r join experiments e on r.experiment_id = e.experiment_id "
                       "where e.name = 'e2e-study'")
        rows = dict(cursor.fetchall())
    assert rows == {r.info.run_id: r.info.status for r in runs}
    from trainers.state.storage import Storage

    artifacts = Storage(f"s3://{BUCKET}/mlartifacts")
    assert any(p.endswith(f"{parent_id}/artifacts/report/report.html") for p in artifacts.fs.find(artifacts.root))
    logged_study = json.loads(Path(client.download_artifacts(parent_id, "report/study.json", str(tmp_path))).read_text())

    # Nothing of the driver is left: the checkout it was submitted from, Ray's copies of it on the
    # nodes (where the driver and the workers ran), and the run outputs.
    shutil.rmtree(checkout)
    package = cluster.job(job_id)["runtime_env"]["working_dir"].removeprefix("gcs://").removesuffix(".zip")
    copies = list(cluster.root.glob(f"ray/*/session_latest/runtime_resources/working_dir_files/{package}"))
    assert len(copies) == 2, copies
    for copy in copies:
        shutil.rmtree(copy)
    outputs = Storage(f"s3://{BUCKET}/runs/e2e")
    assert outputs.exists("report", "report.html")
    outputs.remove()

    # `trdpo report` from another directory, another process: the server alone rebuilds it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rebuilt = cluster.trdpo("report", parent_id, cwd=elsewhere)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    report = elsewhere / f"report-{parent_id}"
    assert rebuilt.stdout.strip().endswith(f"report: {report / 'report.html'}")
    html = (report / "report.html").read_text()
    for section in ("fig-frontier", "fig-winrates", "tbl-matched-kl", "tbl-end-of-training"):
        assert f'id="{section}"' in html, section
    assert json.loads((report / "study.json").read_text()) == logged_study

    # The MLflow UI, in a real browser: the experiment's runs, the parent with its children.
    from browser import mlflow_ui_shows

    mlflow_ui_shows(cluster, client.get_experiment_by_name("e2e-study").experiment_id, parent, children, tmp_path)


def test_a_sweep_submitted_to_the_cluster_spreads_its_trials_over_both_nodes(cluster):
    job_id = submit(cluster, "sweep", "tests/e2e/sweep_two_nodes.yaml", "--submit")
    output = wait_for_job(cluster, job_id, 300)
    done = re.search(r"done: sweep run (\w+); (\d+) completed, (\d+) stopped early, (\d+) errored", output)
    assert done and int(done.group(2)) + int(done.group(3)) == 2 and done.group(4) == "0", output[-3000:]
    # 1-worker trials train in their trial processes (no Ray Train worker group): those spread.
    placed = train_worker_nodes(cluster, job_id, "ImplicitFunc")
    assert len(placed) >= 2 and set(placed.values()) == set(cluster.alive_nodes())
    assert not train_worker_nodes(cluster, job_id)
    client = MlflowClient(cluster.tracking_uri)
    runs = runs_of(client, "e2e-sweep")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == done.group(1)]
    assert len(trials) == 2 and not [r for r in runs if r.info.status == "RUNNING"]
    # Every reservation was released, the stopped trial's included (see FACTS: the hang trap).
    assert {g["state"] for g in cluster.state("placement_groups")} <= {"REMOVED"}


def test_a_node_lost_mid_training_rejoins_and_the_run_ends_as_an_uninterrupted_one(cluster):
    from trainers.state.checkpoint import read_checkpoint
    from trainers.loop import CHECKPOINTS
    from trainers.state.storage import Storage

    # `trdpo train` has no --submit: the host submits it through the same API as `trdpo submit`.
    straight_job = submit(cluster, "train", *sets([*LONG, "tracking.run_name=straight"]))
    wait_for_job(cluster, straight_job, 300)

    first_nodes = cluster.alive_nodes()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lost_job = submit(cluster, "train", *sets([*LONG, "tracking.run_name=lost"]))
    client = MlflowClient(cluster.tracking_uri)

    def steps_logged() -> int:
        runs = client.search_runs([client.get_experiment_by_name("e2e-node-loss").experiment_id],
                                  filter_string="attributes.run_name = 'lost'")
        return max((m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")), default=0) if runs else 0

    wait_until(lambda: steps_logged() > 12, 240, "the run past its first checkpoint", every_s=0.2)
    cluster.started["worker"].stop(signal.SIGKILL)  # the worker node's container dies: every process of it
    killed_at, lost_at = steps_logged(), time.time()
    assert killed_at < 48, "the run ended before the node could be lost"
    wait_until(lambda: len(cluster.alive_nodes()) == 1, 120, "the head to see the node gone")
    print(f"[e2e] node lost after step {killed_at}; the head saw it in {time.time() - lost_at:.1f} s", file=sys.stderr)
    cluster.ray_node("ray-worker", "worker")  # compose's restart policy brings the worker back
    wait_until(lambda: len(cluster.alive_nodes()) == 2, 120, "the worker to rejoin")
    print(f"[e2e] the worker rejoined {time.time() - lost_at:.1f} s after the loss", file=sys.stderr)
    output = wait_for_job(cluster, lost_job, 300)
    assert "resuming from s3://" in output, output[-3000:]

    rejoined = set(cluster.alive_nodes())
    assert rejoined != set(first_nodes)  # a new node id: the old node is gone for good
    placed = train_worker_nodes(cluster, lost_job)
    assert rejoined <= set(placed.values())  # the resumed attempt ran on the head and the new node

    straight = read_checkpoint(Storage(f"s3://{BUCKET}/runs/straight").child(CHECKPOINTS))
    lost = read_checkpoint(Storage(f"s3://{BUCKET}/runs/lost").child(CHECKPOINTS))
    assert lost["step"] == straight["step"] == 48 and lost["world_size"] == 2
    for part in ("policy", "reference"):
        assert max((lost[part][k] - straight[part][k]).abs().max().item() for k in straight[part]) == 0.0, part
    runs = runs_of(client, "e2e-node-loss")
    lost_run = next(r for r in runs if r.info.run_name == "lost")
    assert lost_run.info.status == "FINISHED" and not [r for r in runs if r.info.status == "RUNNING"]
    assert lost_run.data.tags["git_commit"] == commit  # the checkout's commit travels with the job (no .git)
    # The steps repeated after the resume are logged once.
    assert sorted(m.step for m in client.get_metric_history(lost_run.info.run_id, "train/loss")) == list(range(1, 49))
