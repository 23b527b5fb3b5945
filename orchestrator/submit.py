"""Cluster submission through the Ray Jobs API.

    trdpo submit exp.yaml --address http://HEAD:8265      # = trdpo run exp.yaml, on the cluster
    trdpo sweep tune_configs/x.yaml --submit --address http://HEAD:8265
    trdpo status|logs|stop JOB_ID --address http://HEAD:8265

The working directory travels as the job's runtime environment (``working_dir``), minus virtual
environments, VCS data, local MLflow stores, run outputs and anything that looks like a secret.
Judge API keys are *not* shipped: set the variable named by ``evaluation.judge.api_key_env`` on
the cluster's nodes (or in your cluster launcher's environment).
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from trainers.errors import UserFacingError

EXCLUDES = [
    ".git", ".venv", "venv", "env", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache",
    "mlflow.db", "*.db", "mlruns", "mlartifacts", "trdpo_runs", "*.sqlite",
    ".whl", ".gl", "docker/data",
    ".env", "*.env", ".envrc", "*.pem", "*.key", "*secret*", "*credential*", ".netrc", ".pypirc",
]


class SubmitError(UserFacingError, RuntimeError):
    pass


def _auth_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def client(address: str):
    """A Jobs API client. Clusters started by recent Ray require a token: when the cluster asks for
    one, the token at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is sent."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = _auth_token()
    for headers in ({}, {"Authorization": f"Bearer {token}"} if token else None):
        if headers is None:
            break
        try:
            return JobSubmissionClient(address, headers=headers or None)
        except AuthenticationError:
            continue
        except Exception as exc:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError from the SDK
            raise SubmitError(f"--address {address}: cannot reach the Ray Jobs API ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    raise SubmitError(f"--address {address}: the cluster requires a Ray auth token that was not accepted or not found; "
                      "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (see `ray get-auth-token`)")


TRAVELLING_ENV = ("MLFLOW_TRACKING_URI", "TRDPO_OUTPUT_DIR")  # set here, they are set for the job too


def durable_locations(tracking_uri: str | None, output_dir: str | None) -> list[str]:
    """Where a job would lose its results: relative paths are resolved inside Ray's temporary copy
    of the working directory on the cluster, which Ray deletes after the job. Returns one phrase
    per such location (empty when the store and the outputs survive the job)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    outputs = output_dir or os.environ.get("TRDPO_OUTPUT_DIR") or "trdpo_runs"
    problems = []
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        problems.append(f"its MLflow store ({uri})")
    elif "://" not in uri and not Path(uri).is_absolute():
        problems.append(f"its MLflow store ({uri})")
    if "://" not in outputs and not Path(outputs).is_absolute():
        problems.append(f"its checkpoints and models ({outputs})")
    return problems


def check_durable(tracking_uri: str | None, output_dir: str | None) -> None:
    problems = durable_locations(tracking_uri, output_dir)
    if problems:
        raise SubmitError(
            f"the job would write {' and '.join(problems)} inside Ray's temporary copy of the working directory, "
            "which Ray deletes after the job; set tracking.tracking_uri to an MLflow server (http://...) or an absolute "
            "path on the head, and tracking.output_dir to s3://... or a path every node can reach (or export "
            "MLFLOW_TRACKING_URI / TRDPO_OUTPUT_DIR here: they travel with the job)")


def submit(args: list[str], address: str, working_dir: str | Path = ".", job_id: str | None = None,
           agent_wait_s: float = 60.0) -> str:
    """Submit ``python -m orchestrator.cli ARGS`` with the working directory; returns the job id.

    A cluster that has just started answers "No available agent to submit job" until its job
    agent is up: that one error is retried for up to ``agent_wait_s``."""
    working_dir = Path(working_dir).resolve()
    entrypoint = "python -m orchestrator.cli " + " ".join(shlex.quote(a) for a in args)
    env_vars = {k: os.environ[k] for k in TRAVELLING_ENV if os.environ.get(k)}
    commit = _commit_of(working_dir)
    if commit:  # .git is not shipped: the job's runs get their git_commit tag from here
        env_vars["TRDPO_GIT_COMMIT"] = commit
    jobs = client(address)
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return jobs.submit_job(
                entrypoint=entrypoint, submission_id=job_id,
                runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES,
                             "env_vars": env_vars},
                metadata={"trdpo.command": " ".join(args[:2])},
            )
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise SubmitError(f"--address {address}: the cluster refused the job ({str(exc).splitlines()[0]})") from None
            time.sleep(1.0)


def _commit_of(working_dir: Path) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=working_dir, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def relative_to_working_dir(path: Path, working_dir: str | Path = ".") -> str:
    """Config files are passed to the job relative to the shipped working directory."""
    try:
        return str(path.resolve().relative_to(Path(working_dir).resolve()))
    except ValueError:
        raise SubmitError(f"{path}: must lie inside the working directory that is shipped ({Path(working_dir).resolve()})") from None


def _asking(address: str, job_id: str, call):
    """The Jobs SDK reports an HTTP error answer (an unknown job id, a refused request) as a
    RuntimeError "Request failed with status code ...": that answer is the user's to act on."""
    try:
        return call()
    except RuntimeError as exc:
        if not str(exc).startswith("Request failed with status code"):
            raise
        raise SubmitError(f"job {job_id} at {address}: {str(exc).splitlines()[0]}") from None


def status(job_id: str, address: str) -> str:
    jobs = client(address)
    return str(_asking(address, job_id, lambda: jobs.get_job_status(job_id)))


def logs(job_id: str, address: str) -> str:
    jobs = client(address)
    return _asking(address, job_id, lambda: jobs.get_job_logs(job_id))


def stop(job_id: str, address: str) -> bool:
    jobs = client(address)
    return _asking(address, job_id, lambda: jobs.stop_job(job_id))
