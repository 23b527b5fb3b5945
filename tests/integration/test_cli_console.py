"""The console of a real `trdpo train` (a fresh process with its own local Ray, as a user runs it):
trdpo's lines only, Ray's in the log file it names; a worker's failure still on the console. The
successful run is also the CLI's training on Ray end to end (its result line, the exported policy)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# What Ray prints on its own behalf, unless trdpo routes it to the log file: lines relayed from a Ray
# process ("(TrainController pid=916) ...", "(raylet) ...", Ray's colour codes around them),
# records of Ray's driver-side loggers ("2026-11-29 23:56:36,949<TAB>INFO worker.py:2029 -- ..."),
# and the known texts of Train's controller and workers and of the C++ core worker.
RAY_INTERNAL = [
    r"^(\x1b\[\d+m)?\((\w+ )?pid=\d+(, ip=[\d.]+)?\)",
    r"^(\x1b\[\d+m)?\((raylet|autoscaler|gcs_server)\)",
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(DEBUG|INFO|WARNING|ERROR)\s",
    r"Started a local Ray instance", r"Token authentication is enabled",
    r"Requesting resources", r"Attempting to start training worker group", r"Started training worker group",
    r"Setting up process group for", r"Reporting training result", r"TrainingReport\(", r"Checkpoint successfully created",
    r"core_worker\.cc", r"PreemptionWatcher", r"PlacementGroupCleaner", r"RAW: ", r"PYTHON worker processes have been started",
    r"INFO mlflow\.",
]
# Error-level lines: a log record or C++ line at ERROR/FATAL, a traceback, trdpo's own "error: ...".
ERROR_LEVEL = [r"\bERROR\b", r"\bCRITICAL\b", r"\bFATAL\b", r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [EF] \d+ \d+\]", r"Traceback \(most recent call last\)",
               r"^error: "]


def trdpo_train(overrides: list[str], root: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "orchestrator.cli", "train"]
    for value in overrides + list(extra):
        args += ["--set", value]
    env = {k: v for k, v in os.environ.items() if k not in ("TRDPO_VERBOSE", "RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    env.update(TRDPO_LOG_DIR=str(root / "logs"), PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def matching(lines: list[str], patterns: list[str]) -> list[str]:
    return [line for line in lines if any(re.search(p, line) for p in patterns)]


def test_a_training_console_has_trdpo_lines_only_and_names_the_log_file_of_ray_messages(tmp_path, tiny_cli):
    # trdpo creates the MLflow store, as on a user's first run: MLflow's chatter about it ("INFO mlflow."
    # above) goes to the log file too.
    done = trdpo_train(tiny_cli(tmp_path, premade_store=False), tmp_path)
    console = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, "\n".join(console[-60:])
    assert matching(console, RAY_INTERNAL) == []
    assert matching(console, ERROR_LEVEL) == []
    # trdpo's own lines are all there: data, start, progress with rate and ETA, the result.
    assert any(line.startswith("[trdpo] train: synthetic: 160 rows read") for line in console)
    assert any(re.match(r"\[demo-soft-a0\.6-t4\] step 12/12 loss=\S+ val_acc=\S+ \(\S+ steps/s, ETA 0s\)$", line) for line in console)
    assert any(line.startswith("done: run demo-soft-a0.6-t4") and "final validation {'val/loss'" in line for line in console)
    assert (tmp_path / "runs" / "demo-soft-a0.6-t4" / "policy" / "config.json").exists()
    # The command it suggests is one the user's shell finds (here, as under `make`, the venv's bin
    # is not on PATH: then it is named by its path).
    [browse] = [line for line in console if line.startswith("browse: ")]
    program = shlex.split(browse.removeprefix("browse: "))[0]
    assert ((tmp_path / program).is_file() if "/" in program else shutil.which(program)), browse
    progress = [line for line in console if re.match(r"\[demo-soft-a0\.6-t4\] step ", line)]
    assert len(progress) == len(set(progress))  # once per change
    # The log file it names holds what Ray said, and is the run's MLflow artifact.
    [named] = [line for line in console if line.startswith("[trdpo] Ray's messages: ")]
    log_file = Path(re.match(r"\[trdpo\] Ray's messages: (\S+) \(--verbose shows them here; Ray's own logs: \S+\)$", named).group(1))
    assert log_file.parent == tmp_path / "logs" and log_file.is_file()
    logged = log_file.read_text()
    for said_by_ray in ("(TrainController pid=", "Attempting to start training worker group", "Reporting training result 1: TrainingReport(",
                        "] INFO: Started a local Ray instance"):
        assert said_by_ray in logged, said_by_ray
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = re.search(r"done: run \S+ \((\w+)\)", done.stdout).group(1)
    assert [a.path for a in client.list_artifacts(run_id, "logs")] == [f"logs/{log_file.name}"]


def test_a_failure_only_a_worker_sees_is_on_the_quiet_console(tmp_path, tiny_cli):
    """The validation file is read by the workers only: its bad row fails them, not the driver's
    checks before the start. The console says so, without Ray's prefixes or chatter."""
    bad = tmp_path / "val.jsonl"
    bad.write_text('{"prompt": "q", "chosen": " a"}\n')
    done = trdpo_train(tiny_cli(tmp_path), tmp_path, "data.format=preference", f"data.path={FIXTURES}/preference.jsonl", f"data.validation_path={bad}")
    console = (done.stdout + done.stderr).splitlines()
    # The mistake's own one line, not Ray's WorkerGroupError and a worker traceback, and exit
    # code 2 (a user's mistake), as for the mistakes the driver finds before the start.
    errors = [line for line in console if line.startswith("error: ")]
    assert done.returncode == 2, "\n".join(console[-60:])
    assert errors == [f"error: {bad}, row 1: missing field 'rejected' (set data.on_bad_row=skip to skip such rows)"], "\n".join(console[-60:])
    assert matching(console, RAY_INTERNAL[:3]) == []  # no relayed or Ray-logger lines, even on failure
