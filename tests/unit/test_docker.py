"""The image is the tested set, and the compose file hands the one Ray token to every node.

No container engine runs here: these read the files. tests/e2e runs the compose file's commands
as processes (a 2-node cluster with token auth, MLflow on PostgreSQL)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normal(name)] = version
    return pins


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normal(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0])


def _pip_installs(dockerfile: str) -> list[list[str]]:
    """The argument lists of every `pip install` in the Dockerfile's RUN lines."""
    text = dockerfile.replace("\\\n", " ")
    installs = []
    for command in re.findall(r"pip install ([^&\n]+)", text):
        installs.append(shlex.split(command))
    return installs


def test_the_image_installs_torch_at_ci_version_first_then_everything_at_its_constraints_pin():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    ci_torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1) == ci_torch
    torch_install, dependency_install, package_install = _pip_installs(dockerfile)
    assert torch_install[0] == "torch==${TORCH_VERSION}" and "--index-url" in torch_install
    # Everything else is constrained to the tested set, which the image copies before installing.
    assert dependency_install[:2] == ["-c", "constraints.txt"]
    assert dockerfile.index("COPY constraints.txt") < dockerfile.index("pip install -c constraints.txt")
    pins = _pins()
    assert "torch" not in pins  # torch's variant is chosen by its index, its version above
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # The requirements file is the project's dependencies and the extras the Dockerfile names.
    extras = re.findall(r"\['optional-dependencies'\]\['(\w+)'\]", dockerfile)
    assert extras == ["s3"]
    requested = [*project["dependencies"], *(r for extra in extras for r in project["optional-dependencies"][extra])]
    requested += [arg for arg in dependency_install[2:] if not arg.startswith("-") and arg != "/tmp/requirements.txt"]
    names = {_requirement_name(r) for r in requested} - {"torch"}
    assert {"psycopg", "boto3", "s3fs", "mlflow", "ray"} <= names
    assert names - set(pins) == set(), "installed by the image but not pinned in constraints.txt"
    # The project itself last, adding nothing: its dependencies are all in the layer above.
    assert package_install == ["--no-deps", "-e", "."]
    # The PostgreSQL driver the image installs is the one the tests use (dev extra).
    assert "psycopg" in {_requirement_name(r) for r in project["optional-dependencies"]["dev"]}
    # psycopg[binary]: its C build is pinned too.
    assert "psycopg-binary" in pins


def test_the_dependency_layer_comes_before_the_source_so_editing_code_does_not_rebuild_it():
    """Docker rebuilds every layer after the first one whose inputs changed: the dependencies
    must be installed from files that change only when they do (constraints, pyproject)."""
    dockerfile = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    steps = [line.split(None, 1) for line in dockerfile.splitlines() if line and not line.startswith("#")]
    dependency_step = next(i for i, (op, arg) in enumerate(steps) if op == "RUN" and "-r /tmp/requirements.txt" in arg)
    copied_before = [arg.split()[:-1] for op, arg in steps[:dependency_step] if op == "COPY"]
    assert copied_before == [["constraints.txt", "pyproject.toml"]]
    source = [i for i, (op, arg) in enumerate(steps) if op == "COPY" and arg.split()[0] in {"orchestrator", "trainers", "evaluation", "README.md"}]
    assert len(source) == 4 and min(source) > dependency_step


def test_the_cuda_variant_is_documented_with_its_index():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert "--build-arg TORCH_INDEX_URL=" in dockerfile and "CUDA" in dockerfile
    readme = (DOCKER / "README.md").read_text()
    assert "TORCH_INDEX_URL" in readme and "CUDA" in readme


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_every_ray_node_and_no_other_service_gets_the_token_with_auth_on_by_default():
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= set(services)
    assert compose["secrets"]["ray_auth_token"]["file"] == "${RAY_AUTH_TOKEN_FILE:-./secrets/ray_auth_token}"
    for name in ("ray-head", "ray-worker"):
        service = services[name]
        assert service["secrets"] == ["ray_auth_token"]
        assert service["environment"]["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"
        assert service["environment"]["RAY_AUTH_MODE"] == "${RAY_AUTH_MODE:-token}"
        assert service["environment"]["TRDPO_OUTPUT_DIR"] == "${TRDPO_OUTPUT_DIR:-/runs}"
        assert "runs:/runs" in service["volumes"]
    assert "secrets" not in services["mlflow"] and "RAY_AUTH_TOKEN_PATH" not in services["mlflow"]["environment"]
    # The secret file and local settings never travel with a submitted job, nor into git.
    from orchestrator.submit import EXCLUDES

    assert {".env", "*.env", "*secret*"} <= set(EXCLUDES)
    ignored = (DOCKER / ".gitignore").read_text().split()
    assert {".env", "cluster.env", "secrets/*"} <= set(ignored)


def test_the_worker_joins_the_head_port_and_mlflow_serves_postgres_and_the_configured_artifacts():
    services = _compose()["services"]
    head, worker = shlex.split(services["ray-head"]["command"]), shlex.split(services["ray-worker"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and head[head.index("--port") + 1] == "6379"
    assert worker[worker.index("--address") + 1] == "ray-head:6379" and "--block" in worker and "--block" in head
    assert worker_restarts(services["ray-worker"])
    mlflow = shlex.split(services["mlflow"]["command"])
    db = services["postgres"]["environment"]
    store = mlflow[mlflow.index("--backend-store-uri") + 1]
    assert store == f"postgresql://{db['POSTGRES_USER']}:{db['POSTGRES_PASSWORD']}@postgres:5432/{db['POSTGRES_DB']}"
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == "${MLFLOW_ARTIFACTS_DESTINATION:-/mlartifacts}"
    assert mlflow[mlflow.index("--allowed-hosts") + 1] == "*"
    # No authentication in MLflow: published on the host's loopback unless the user says otherwise.
    assert services["mlflow"]["ports"] == ["${MLFLOW_PUBLISH:-127.0.0.1:5000}:5000"]
    assert services["ray-head"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def worker_restarts(service: dict) -> bool:
    return service.get("restart") in {"unless-stopped", "always", "on-failure"}


def test_output_dir_follows_the_environment(monkeypatch):
    from orchestrator.config import TrackingConfig

    monkeypatch.setenv("TRDPO_OUTPUT_DIR", "/runs")
    assert TrackingConfig().output_dir == "/runs"
    monkeypatch.delenv("TRDPO_OUTPUT_DIR")
    assert TrackingConfig().output_dir == "trdpo_runs"
