"""A user's mistake raised inside a Ray worker reaches the console as its own one line; anything
else (a bug, a crashed worker) keeps its traceback. Ray's real exception types, built here as Ray
builds them in the driver (no Ray is started)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from ray.exceptions import RayTaskError
from ray.train import ControllerError, WorkerGroupError

from orchestrator.cli_common import CleanErrors
from trainers.data.types import DataError
from trainers.errors import user_facing_cause
from trainers.state.storage import StorageUnreachable

MISTAKE = DataError("val.jsonl, row 7: 'chosen' is empty (set data.on_bad_row=skip to skip such rows)")


def task_error(cause: BaseException) -> RayTaskError:
    """What ray.get raises for a task or actor method that raised ``cause``: an instance of both
    RayTaskError and the cause's class, whose text is the remote traceback."""
    return RayTaskError("JudgeActor.judge", "Traceback (most recent call last):\n  ...\n" + repr(cause), cause).as_instanceof_cause()


@pytest.mark.parametrize("wrapped", [
    MISTAKE,
    task_error(MISTAKE),
    WorkerGroupError("[Rank 0 Error Snippet]: ...", {1: RuntimeError("gloo: connection closed by peer"), 0: MISTAKE}),
    ControllerError(task_error(MISTAKE)),
], ids=["plain", "task", "train-workers", "train-controller"])
def test_the_mistake_is_found_behind_rays_wrappers(wrapped):
    assert user_facing_cause(wrapped) is MISTAKE


def test_the_lowest_rank_mistake_is_the_one_shown():
    other = StorageUnreachable("s3://bucket/runs/x/checkpoints", "read", TimeoutError("timed out"))
    failures = {3: other, 1: MISTAKE, 0: RuntimeError("collective aborted")}
    assert user_facing_cause(WorkerGroupError("...", failures)) is MISTAKE


@pytest.mark.parametrize("bug", [
    KeyError("step"),
    task_error(ZeroDivisionError("division by zero")),
    WorkerGroupError("...", {0: AttributeError("'NoneType' object has no attribute 'to_local'")}),
], ids=["plain", "task", "train-workers"])
def test_a_bug_is_not_a_mistake(bug):
    assert user_facing_cause(bug) is None


def test_an_error_raised_while_handling_a_mistake_is_a_bug():
    try:
        try:
            raise MISTAKE
        except DataError:
            {}["missing"]  # noqa: B018 - a bug in an except block
    except KeyError as bug:
        assert user_facing_cause(bug) is None


def _cli(error: BaseException) -> click.Group:
    @click.group(cls=CleanErrors)
    def main() -> None:
        pass

    @main.command()
    def go() -> None:
        raise error

    return main


def test_the_cli_prints_a_wrapped_mistake_as_one_line():
    wrapped = WorkerGroupError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback ...", {0: MISTAKE})
    result = CliRunner().invoke(_cli(wrapped), ["go"])
    assert result.exit_code == 2
    assert result.output == f"error: {MISTAKE}\n"


@pytest.mark.parametrize("bug", [ValueError("could not convert string to float: 'x'"), OSError(5, "Input/output error"),
                                 RuntimeError("CUDA error"), task_error(KeyError("step"))],
                         ids=["ValueError", "OSError", "RuntimeError", "wrapped"])
def test_the_cli_lets_a_bug_keep_its_traceback(bug):
    result = CliRunner().invoke(_cli(bug), ["go"])
    assert result.exit_code == 1 and result.exception is bug
