"""Which relayed lines reach the console and which go only to the log file (no Ray started here:
the batches are shaped as Ray 2.60 relays them; tests/integration/test_cli_console.py checks a real run)."""

from __future__ import annotations

import logging
import os
import shlex

import pytest

from orchestrator import console

CONTROLLER = {"pid": 916, "actor_name": "TrainController", "is_err": True}
WORKER = {"pid": 1290, "actor_name": "RayTrainWorker", "is_err": False}

# Lines as a clean 1-worker training printed them before this module existed.
RAY_CHATTER = [
    (CONTROLLER, "Requesting resources: {'CPU': 1.0} * 1"),
    (CONTROLLER, "Attempting to start training worker group of size 1 with the following resources: [{'CPU': 1.0}] * 1"),
    (CONTROLLER, "[2026-11-29 23:56:57,714 E 32132 32164] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
                 "and ID: 'ef2e' has constructor arguments in the object store and max_restarts > 0."),
    (CONTROLLER, "- (ip=192.0.2.2, pid=32285) world_rank=0, local_rank=0, node_rank=0"),
    ({**WORKER, "is_err": True}, "Setting up process group for: env:// [rank=0, world_size=1]"),
    ({**WORKER, "is_err": True}, "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 6}, validation=False) from rank 0"),
    ({"pid": 816, "actor_name": "run_trial", "is_err": True}, "[mutex.cc : 452] RAW: Lock blocking 0x555f33d52ee0   @ 0x7f3015e2b1a2"),
    ({"pid": "raylet", "is_err": False}, "WARNING: 8 PYTHON worker processes have been started on node: d22f with address: 192.0.2.2"),
    ({"pid": 1174, "actor_name": "PlacementGroupCleaner", "is_err": True}, "[trdpo-like] a label from a Ray process is still Ray's"),
    ({**WORKER, "is_err": True}, "Traceback (most recent call last):"),  # the driver raises it; the CLI shows it
]
TRDPO_LINES = [
    (WORKER, "[trdpo] train: synthetic: 160 rows read, 160 kept; skipped: none"),
    (WORKER, "[demo-soft-a0.6-t4] step 12/12 loss=0.694 val_acc=0.625 (24.93 steps/s, ETA 0s)"),
    ({"pid": 77, "task_name": "_sampled_kl", "is_err": True}, "[judge p vs sft [hh]] 4/8 (2.0/s, ETA 2s)"),
]


@pytest.fixture
def log_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(console.LOG_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(console, "LOG", console.LogFile())
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    return tmp_path


def relay(batches, capsys):
    shown_by_ray = []
    for meta, line in batches:
        console.route({**meta, "lines": [line]}, shown_by_ray.append)
    out = capsys.readouterr()
    return out.out + out.err, shown_by_ray


def test_quiet_console_shows_trdpo_lines_without_ray_prefix_and_logs_everything(log_dir, capsys):
    said, shown_by_ray = relay(RAY_CHATTER + TRDPO_LINES, capsys)
    assert said.splitlines() == [line for _, line in TRDPO_LINES]
    assert shown_by_ray == []
    logged = console.LOG.path.read_text()
    assert console.LOG.path.parent == log_dir
    for meta, line in RAY_CHATTER + TRDPO_LINES:
        assert f"({meta.get('actor_name') or meta.get('task_name') or meta['pid']}" in logged and line in logged


def test_verbose_hands_every_batch_to_ray_and_still_logs(log_dir, capsys, monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    said, shown_by_ray = relay(RAY_CHATTER, capsys)
    assert said == "" and [b["lines"][0] for b in shown_by_ray] == [line for _, line in RAY_CHATTER]
    assert "Requesting resources" in console.LOG.path.read_text()


def test_library_records_below_their_level_go_to_the_log_file_only(log_dir, capsys, monkeypatch):
    logger = logging.getLogger("ray.test_console")
    handler = logging.StreamHandler()  # stands in for the console handler Ray put on "ray"
    ray_logger = logging.getLogger("ray")
    monkeypatch.setattr(ray_logger, "handlers", [handler])
    monkeypatch.setattr(ray_logger, "propagate", False)
    monkeypatch.setattr(ray_logger, "level", logging.INFO)
    console.capture_library_logs()
    console.capture_library_logs()  # once is enough: no second filter or file handler
    assert len(ray_logger.handlers) == 2 and len(handler.filters) == 1
    logger.warning("Token authentication is enabled for this Ray cluster.")
    logger.error("the GCS is unreachable")
    err = capsys.readouterr().err
    assert "GCS is unreachable" in err and "Token authentication" not in err
    logged = console.LOG.path.read_text()
    assert "[ray.test_console] WARNING: Token authentication" in logged and "ERROR: the GCS is unreachable" in logged
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    logger.warning("shown with --verbose")
    assert "shown with --verbose" in capsys.readouterr().err


def test_nothing_written_means_no_file(log_dir):
    assert console.LOG.written() is None and not list(log_dir.iterdir())


@pytest.mark.parametrize("args", [["--verbose", "fields", "training.alpha"], ["train", "--verbose", "--set", "training.alpha=5"]])
def test_the_verbose_flag_reaches_every_process_of_the_run_through_the_environment(args, monkeypatch):
    from click.testing import CliRunner

    from orchestrator.cli import main

    monkeypatch.setenv(console.VERBOSE_ENV, "0")  # restored after the test, whatever the CLI sets
    assert not console.verbose()
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 2) and "Traceback" not in result.output  # train: the bad alpha, in one line
    assert console.verbose()


def test_a_log_file_that_cannot_be_written_never_silences_the_console(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv(console.LOG_DIR_ENV, str(blocked / "logs"))
    monkeypatch.setattr(console, "LOG", console.LogFile())
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    console.announce("/tmp/ray/session_x/logs")
    assert capsys.readouterr().out.startswith("[trdpo] Ray's messages: not kept, the log file cannot be written")
    said, _ = relay(RAY_CHATTER + TRDPO_LINES, capsys)
    assert said.splitlines() == [line for _, line in TRDPO_LINES]


def test_the_log_directory_keeps_the_newest_runs_logs_and_nothing_else_is_touched(log_dir, monkeypatch):
    import os

    monkeypatch.setenv(console.LOG_KEEP_ENV, "3")
    for age, name in enumerate(["20261201-100000-11.log", "20261201-110000-12.log", "20261201-120000-13.log",
                                "20261201-130000-14.log"]):
        (log_dir / name).write_text("old run\n")
        os.utime(log_dir / name, (1_000_000 + age, 1_000_000 + age))
    (log_dir / "notes.log").write_text("the user's own file")
    console.LOG.write(["[trdpo] a new run"])
    kept = sorted(p.name for p in log_dir.iterdir())
    assert kept == sorted(["20261201-120000-13.log", "20261201-130000-14.log", console.LOG.written().name, "notes.log"])


def test_suggested_commands_are_named_as_this_shell_can_run_them(tmp_path, monkeypatch):
    """`make demo` runs .venv/bin/trdpo with the venv off PATH: the closing `browse:` line must name
    a command that works when pasted, not a bare `trdpo` the shell cannot find."""
    env_bin = tmp_path / "my env" / "bin"
    env_bin.mkdir(parents=True)
    for name in ("python", "trdpo"):
        (env_bin / name).write_text("#!/bin/sh\n")
        (env_bin / name).chmod(0o755)
    other_bin = tmp_path / "other"
    other_bin.mkdir()
    (other_bin / "trdpo").write_text("#!/bin/sh\n")
    (other_bin / "trdpo").chmod(0o755)
    monkeypatch.setattr(console.sys, "executable", str(env_bin / "python"))

    monkeypatch.setenv("PATH", f"{env_bin}{os.pathsep}/usr/bin")
    assert console.as_typed("trdpo") == "trdpo"  # PATH finds this environment's copy
    monkeypatch.setenv("PATH", f"{other_bin}{os.pathsep}{env_bin}")
    monkeypatch.chdir(tmp_path)  # another trdpo comes first on PATH: ours by its path, relative here
    assert console.as_typed("trdpo") == "'my env/bin/trdpo'"
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.chdir(other_bin)  # not under the directory that holds it: absolute
    assert console.as_typed("trdpo") == shlex.quote(str(env_bin / "trdpo"))
    assert console.as_typed("not-installed-here") == "not-installed-here"
