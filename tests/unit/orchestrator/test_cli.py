"""Every command documents itself, and user errors are one line with a non-zero exit."""

import socket

import pytest
from click.testing import CliRunner

from orchestrator.cli import main

COMMANDS = ["run", "train", "sweep", "eval", "submit", "status", "logs", "stop", "ui", "validate", "fields", "plan", "report"]


def test_top_level_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f"  {command} " in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_a_description_and_documented_options(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    description = [line for line in lines[1:6] if line.strip()]
    assert description, f"{command} has no description"
    options = result.output.split("Options:", 1)[1]
    for line in options.splitlines():
        if line.strip().startswith("--") and "--help" not in line:
            assert len(line.split(maxsplit=1)) == 2 or "  " in line.strip(), f"{command}: undocumented option {line!r}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "missing.yaml"], "missing.yaml: invalid config"),
        (["train", "--set", "training.alpha=2"], "training.alpha: must be ≤ 1.0, got 2"),
        (["train", "--address", f"127.0.0.1:{free_port()}"], "no Ray cluster answers there"),
        (["sweep", "missing.yaml"], "missing.yaml: invalid config"),
        (["run", "--submit"], "--submit needs --address"),
        (["fields", "nope"], "no config field starts with 'nope'"),
        # Nothing can be written under /proc, not even by root: a read-only output directory or store.
        (["train", "--no-ray", "--set", "tracking.output_dir=/proc/trdpo-runs", "--set", "tracking.tracking_uri=sqlite:///m.db"],
         "cannot write to /proc/trdpo-runs"),
        (["train", "--no-ray", "--set", "tracking.tracking_uri=sqlite:////proc/trdpo/m.db"], "cannot create /proc/trdpo for the MLflow store"),
        # A job runs in Ray's temporary copy of the working directory: relative outputs would vanish.
        (["run", "--submit", "--address", f"http://127.0.0.1:{free_port()}"], "inside Ray's temporary copy of the working directory"),
        (["plan", "--gpu-memory", "lots"], "--gpu-memory 'lots': expected a size such as 80GiB"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.startswith("error: ")
