"""Progress lines, and what a Ray Train worker imports to receive the step logger."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys

import pytest

from orchestrator.progress import StepLogger, StepProgress


def test_a_progress_line_has_a_rate_only_once_there_are_two_reports(monkeypatch):
    clock = iter([100.0, 100.0, 104.0, 104.0])  # constructor, first update, second update
    monkeypatch.setattr("orchestrator.progress.time.perf_counter", lambda: next(clock))
    out = io.StringIO()
    progress = StepProgress(10, "run", stream=out, min_interval_s=0.0)
    progress.update(2, loss=0.69)
    progress.update(6, loss=0.5)
    # 4 steps in 4 s: 1 step/s, 4 steps left.
    assert out.getvalue().splitlines() == ["[run] step 2/10 loss=0.69", "[run] step 6/10 loss=0.5 (1.00 steps/s, ETA 4s)"]


@pytest.mark.integration  # a fresh interpreter, to see what it imports
def test_workers_receive_the_step_logger_without_importing_mlflow():
    """Every worker unpickles the spec holding it; only rank 0, which logs, imports MLflow."""
    blob = pickle.dumps(StepLogger("sqlite:////tmp/x.db", "run-id", "label"))
    code = ("import pickle, sys; logger = pickle.loads(sys.stdin.buffer.read()); "
            "print(type(logger).__name__, [m for m in ('mlflow', 'orchestrator.tracking', 'orchestrator.config') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True)
    assert done.stdout.decode().split() == ["StepLogger", "[]"], done.stderr.decode()[-2000:]
