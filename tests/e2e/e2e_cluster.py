"""The cluster users run, on this host: PostgreSQL (Debian's package, a temporary data directory),
an S3-compatible server (moto), and docker/compose.yaml's own `mlflow`, `ray-head` and
`ray-worker` commands as processes (see compose_processes.py), with one Ray token made here and
handed to the head, the worker and this process (the host that submits).

Everything started here is stopped here, also when a test fails.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import compose_processes as compose

# Speed knobs for tiny runs, given to the nodes on top of the compose file: Ray Train paces each
# report by its controller's health-check poll (2 s by default), and the head declares a silent
# node dead after its health checks fail (several seconds by default).
NODE_SPEED_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                  "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
BUCKET = "trdpo"


def missing_package_line(what: str, package: str) -> str:
    return f"{what} is not installed: apt-get install -y {package}"


def require(what: str, package: str, found: bool) -> None:
    """Skip, in one line naming the Debian package, where one the tier needs is missing; fail
    instead under TRDPO_REQUIRE_E2E (CI installs them, .ci/run)."""
    if found:
        return
    if os.environ.get("TRDPO_REQUIRE_E2E"):
        pytest.fail(missing_package_line(what, package) + " (TRDPO_REQUIRE_E2E is set)", pytrace=False)
    pytest.skip(missing_package_line(what, package))


def wait_until(check, timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last!r})")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.status == 200


@dataclass
class Started:
    """A process this fixture started (its own session, so its children stop with it)."""

    name: str
    process: subprocess.Popen
    log: Path
    marker: str | None = None  # a string in the command line of every process it spawned (a Ray temp dir)

    def processes(self) -> list:
        """Every live process of this service: its process group and, for a Ray node, every
        process that names its temp dir or works in it (workers, agents, a job's driver)."""
        import psutil

        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if os.getpgid(process.pid) == self.process.pid or self.marker and (
                        any(self.marker in part for part in process.info["cmdline"] or [])
                        or process.cwd().startswith(self.marker)):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                continue
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
        stop_together([self], sig, timeout_s)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@dataclass
class Cluster:
    root: Path
    token_file: Path
    s3_endpoint: str
    tracking_uri: str
    dashboard: str  # the Jobs API, as `trdpo submit --address` takes it
    database_uri: str  # MLflow's store, as the compose file names it, mapped here
    gcs: str
    host: compose.Host
    compose_file: dict
    node_ports: dict[str, list[int]]
    started: dict[str, Started] = field(default_factory=dict)
    host_env: dict[str, str] = field(default_factory=dict)  # the environment of `trdpo` on the submitting host
    commands: dict[str, str] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str], marker: str | None = None, cwd: Path | None = None) -> Started:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd or self.root,
                                       start_new_session=True)
        self.started[name] = Started(name, process, log, marker)
        return self.started[name]

    def compose_service(self, service: str, extra: list[str] = (), node_name: str | None = None) -> Started:
        """Start ``service`` of docker/compose.yaml as compose would, ``extra`` flags appended."""
        name = node_name or service
        home = self.root / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        process = compose.service_process(self.compose_file, service, self.host, home)
        env = {**process.env, **(NODE_SPEED_ENV if service.startswith("ray-") else {})}
        self.commands[name] = " ".join([process.shell(), *extra])
        print(f"[e2e] {name}: {self.commands[name]}", file=sys.stderr)
        return self.start(name, [*process.argv, *extra], env, marker=extra[0].split("=", 1)[1] if extra else None,
                          cwd=home)

    def ray_node(self, service: str, name: str) -> Started:
        temp_dir = self.root / "ray" / name
        return self.compose_service(service, compose.ray_node_flags(temp_dir, self.node_ports[name]), node_name=name)

    def api(self, path: str) -> dict:
        """The dashboard's HTTP API with the cluster's token (what Ray's SDK sends)."""
        request = urllib.request.Request(f"{self.dashboard}{path}",
                                         headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray's state API: nodes, actors, placement groups, ... (dead ones included)."""
        query = [("detail", "1"), ("limit", "10000")]
        for key, value in filters.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        return self.api(f"/api/v0/{resource}?{urllib.parse.urlencode(query)}")["data"]["result"]["result"]

    def alive_nodes(self) -> list[str]:
        return sorted(n["node_id"] for n in self.state("nodes", state="ALIVE"))

    def trdpo(self, *args: str, cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """`trdpo ARGS` on the submitting host (its own process, its environment)."""
        return subprocess.run([str(Path(sys.executable).parent / "trdpo"), *args], cwd=cwd, env=self.host_env,
                              capture_output=True, text=True, timeout=timeout_s)

    def job(self, job_id: str) -> dict:
        return self.api(f"/api/jobs/{job_id}")

    def job_logs(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}/logs")["logs"]

    def stop_all(self) -> None:
        """Everything at once (it is all thrown away): a polite signal, then SIGKILL after 5 s."""
        stop_together(list(self.started.values()), signal.SIGTERM, 5)


def stop_together(services: list[Started], sig: int, timeout_s: float) -> None:
    import psutil

    family = [process for service in services for process in service.processes()]
    for process in family:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    for service in services:
        try:
            service.process.wait(timeout=10)  # reaped, so its exit is seen
        except subprocess.TimeoutExpired:
            print(f"[e2e] {service.name} (pid {service.process.pid}) did not stop", file=sys.stderr)


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _as_postgres_user(argv: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: there (CI, containers) they run as `postgres`."""
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _start_postgres(cluster: Cluster, port: int) -> None:
    settings = compose.postgres_settings(cluster.compose_file, cluster.host)
    user, password, database = settings["POSTGRES_USER"], settings["POSTGRES_PASSWORD"], settings["POSTGRES_DB"]
    bin_dir = postgres_bin()
    pg = cluster.root / "pg"
    pg.mkdir()
    password_file = pg / "password"
    password_file.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(pg, "postgres")
        shutil.chown(password_file, "postgres")
    data = pg / "data"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    subprocess.run(_as_postgres_user([str(bin_dir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={password_file}",
                                      "--auth=scram-sha-256", "--no-sync", "-E", "UTF8"]),
                   env=env, check=True, capture_output=True, timeout=120)
    # A server of its own: loopback only, its socket in its data dir, no fsync (a test database).
    cluster.start("postgres", _as_postgres_user([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(pg),
                                                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]), env)
    client_env = {**env, "PGPASSWORD": password}
    wait_until(lambda: subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", user],
                                      env=client_env, capture_output=True).returncode == 0, 60, "PostgreSQL")
    subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, database],
                   env=client_env, check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def running_cluster():
    """The whole cluster, stopped on the way out (also usable outside pytest, to look around)."""
    started_at = time.time()
    # Short paths: Ray's Unix sockets live under its temp dir (108-byte limit); readable by the
    # postgres user (pytest's own tmp dirs are private to root).
    root = Path(tempfile.mkdtemp(prefix="trdpo-e2e-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        with _cluster_in(root, started_at) as the:
            yield the
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _cluster_in(root: Path, started_at: float):
    # The one token: made once, given to the head, the worker (through the compose file's secret)
    # and this process, which submits (RAY_AUTH_TOKEN_PATH, as docker/README.md says).
    token_file = root / "ray_auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    gcs, dashboard, client_port, mlflow_port, pg_port, s3_port, *rest = compose.free_ports(6 + 12)
    node_ports = {"head": rest[:6], "worker": rest[6:]}
    s3_endpoint = f"http://127.0.0.1:{s3_port}"
    cluster_env = root / "cluster.env"
    s3_settings = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    cluster_env.write_text("".join(f"{k}={v}\n" for k, v in s3_settings.items()))
    compose_file = compose.load()
    host = compose.Host(
        variables={"RAY_AUTH_TOKEN_FILE": str(token_file), "RAY_HEAD_CPUS": "1", "RAY_WORKER_CPUS": "1",
                   "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlartifacts", "TRDPO_OUTPUT_DIR": f"s3://{BUCKET}/runs",
                   "MLFLOW_WORKERS": "1", "MLFLOW_DB_PASSWORD": "pw-" + secrets.token_hex(8)},
        ports={6379: gcs, 8265: dashboard, 10001: client_port, 5000: mlflow_port, 5432: pg_port},
        volumes={name: root / "volumes" / name for name in compose_file["volumes"]},
        files={"./cluster.env": cluster_env}, services=tuple(compose_file["services"]))
    for directory in host.volumes.values():
        directory.mkdir(parents=True)
    mlflow = compose.service_process(compose_file, "mlflow", host, root)  # (only to read its store)
    database_uri = mlflow.argv[mlflow.argv.index("--backend-store-uri") + 1]
    the = Cluster(root, token_file, s3_endpoint, f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{dashboard}",
                  database_uri, f"127.0.0.1:{gcs}", host, compose_file, node_ports)
    # The host that submits: what docker/README.md tells a user to export. trdpo runs there as its
    # own processes (this one reads S3 and MLflow only: Ray's SDK keeps auth settings for the
    # life of a process, and the rest of the suite runs Ray here after this tier).
    the.host_env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))},
                    **s3_settings, "RAY_AUTH_TOKEN_PATH": str(token_file), "MLFLOW_TRACKING_URI": the.tracking_uri,
                    "TRDPO_OUTPUT_DIR": f"s3://{BUCKET}/runs", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    saved = {k: os.environ.get(k) for k in s3_settings}
    try:
        the.start("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], dict(os.environ))
        _start_postgres(the, pg_port)
        wait_until(lambda: http_ok(f"{s3_endpoint}/moto-api/"), 60, "the S3 server")
        import boto3

        boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        the.compose_service("mlflow")
        the.ray_node("ray-head", "head")
        os.environ.update(s3_settings)  # this process checks what lies in the bucket
        wait_until(lambda: isinstance(the.api("/api/jobs/"), list), 90, "the Ray head's Jobs API", every_s=1)
        the.ray_node("ray-worker", "worker")
        wait_until(lambda: len(the.alive_nodes()) == 2, 90, "the worker node to join", every_s=1)
        wait_until(lambda: http_ok(f"{the.tracking_uri}/health"), 120, "the MLflow server")
        print(f"[e2e] cluster up in {time.time() - started_at:.1f} s", file=sys.stderr)
        yield the
    except BaseException:
        for started in the.started.values():
            print(f"[e2e] --- {started.name} ({started.log}) ---\n{started.tail()}", file=sys.stderr)
        raise
    finally:
        the.stop_all()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
