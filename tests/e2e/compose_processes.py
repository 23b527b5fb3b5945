"""docker/compose.yaml's services as processes on this host: no container engine runs here, so the
end-to-end tier runs the file's own commands and environment.

What a container gives each service for free, one shared host gives by mapping:

    service names (postgres, mlflow, ray-head) and 0.0.0.0   ->  127.0.0.1
    the file's ports (6379, 8265, 10001, 5000, 5432)         ->  free ports of this host
    volumes and secrets (/runs, /run/secrets/NAME, ...)      ->  the test's directories and files
    ${VAR:-default}                                          ->  what a user puts in docker/.env
    the image (Dockerfile's ENV, PATH)                       ->  the same ENV, this venv's bin
    a fresh HOME per service, as each container has

Ray nodes that share a host also need their own temp dirs and agent ports (``ray_node_flags``):
containers never share those, so the compose file rightly does not name them.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
LOOPBACK = "127.0.0.1"
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class ComposeError(ValueError):
    pass


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's interpolation: ``${X}``, ``${X:-default}``, ``${X-default}``, ``${X:?error}``, ``$$``."""

    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3) or ""
        current = variables.get(name)
        if operator == ":-":
            return current if current else argument
        if operator == "-":
            return argument if current is None else current
        if operator in (":?", "?") and (current is None or (operator == ":?" and not current)):
            raise ComposeError(f"${{{name}}}: {argument or 'required'}")
        return current or ""

    return _VARIABLE.sub(value, text)


@dataclass
class Host:
    """How the compose file's names map onto this host."""

    variables: dict[str, str]  # docker/.env
    ports: dict[int, int]  # the file's port -> a free port here
    volumes: dict[str, Path]  # named volume -> a directory here
    files: dict[str, Path] = field(default_factory=dict)  # env_file / secret file (as written) -> a file here
    services: tuple[str, ...] = ()

    def rewrite(self, text: str, mounts: dict[str, Path]) -> str:
        def address(match: re.Match) -> str:
            port = int(match.group(2))
            if port not in self.ports:
                raise ComposeError(f"{match.group(0)}: port {port} has no port on this host")
            return f"{LOOPBACK}:{self.ports[port]}"

        names = "|".join(map(re.escape, self.services))
        text = re.sub(rf"(?:(?<=[/@])|^)({names}):(\d+)(?![\w@])", address, text) if names else text
        text = text.replace("0.0.0.0", LOOPBACK)
        if text.isdigit() and int(text) in self.ports:
            return str(self.ports[int(text)])
        for target, here in sorted(mounts.items(), key=lambda item: -len(item[0])):
            if text == target or text.startswith(target + "/"):
                return str(here) + text[len(target):]
        return text


@dataclass
class Process:
    name: str
    argv: list[str]
    env: dict[str, str]

    def shell(self) -> str:
        """The command as one line (what the README's recipe and a log show)."""
        shown = {k: v for k, v in self.env.items() if k not in {"PATH", "HOME"}}
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(shown.items())), *map(shlex.quote, self.argv)])


def load(path: Path = DOCKER / "compose.yaml") -> dict:
    return yaml.safe_load(path.read_text())


def image_environment(dockerfile: Path = DOCKER / "Dockerfile") -> dict[str, str]:
    """The ENV lines of the image (``ENV A=1 B=2``)."""
    env = {}
    for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def service_process(compose: dict, name: str, host: Host, home: Path) -> Process:
    """The command and environment that compose would give service ``name``'s container."""
    service = compose["services"][name]
    if "command" not in service:
        raise ComposeError(f"service {name} runs its image's own entrypoint; it has no command to run here")
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source not in host.volumes:
            raise ComposeError(f"service {name}: volume {source} has no directory on this host")
        mounts[target] = host.volumes[source]
    for secret in service.get("secrets", []):
        written = interpolate(compose["secrets"][secret]["file"], host.variables)
        mounts[f"/run/secrets/{secret}"] = host.files.get(written, DOCKER / written)
    command = service["command"]
    argv = shlex.split(interpolate(command, host.variables)) if isinstance(command, str) else [
        interpolate(str(a), host.variables) for a in command]
    image = "build" in service or str(service.get("image", "")).startswith("trdpo:")
    env = {**(image_environment() if image else {})}
    for entry in service.get("env_file", []):
        path, required = (entry, True) if isinstance(entry, str) else (entry["path"], entry.get("required", True))
        file = host.files.get(path, DOCKER / path)
        if not file.exists():
            if required:
                raise ComposeError(f"service {name}: env_file {path} is missing")
            continue
        env.update(_env_file(file))
    for key, value in (service.get("environment") or {}).items():
        if value is None:  # passed through from the environment of `docker compose`
            if key in host.variables:
                env[key] = host.variables[key]
            continue
        env[key] = interpolate(str(value), host.variables)
    env = {key: host.rewrite(value, mounts) for key, value in env.items()}
    argv = [host.rewrite(arg, mounts) for arg in argv]
    env["PATH"] = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
    env["HOME"] = str(home)
    return Process(name, argv, env)


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def ray_node_flags(temp_dir: Path, ports: list[int]) -> list[str]:
    """What containers keep apart and one host must: each node's temp dir and agent/manager ports.
    (Its address stays the host's: Ray replaces a loopback --node-ip-address by the host's IP.)"""
    agent, grpc, metrics, runtime_env, node_manager, object_manager = ports
    return [f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}"]


def postgres_settings(compose: dict, host: Host) -> dict[str, str]:
    """The official postgres image's settings (POSTGRES_USER, _PASSWORD, _DB) of the compose file."""
    environment = compose["services"]["postgres"]["environment"]
    return {key: interpolate(str(value), host.variables) for key, value in environment.items()}


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def environ_without(*prefixes: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
