"""Ray Train's restarts (``training.max_failures``) are for crashed workers, not a user's mistakes."""

from __future__ import annotations

from ray.train import FailureConfig
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from orchestrator.ray_trainer import UserMistakesAreFinal
from trainers.errors import UserFacingError


def failed(*errors: Exception) -> WorkerGroupError:
    return WorkerGroupError("workers failed", dict(enumerate(errors)))


def test_a_users_mistake_on_any_worker_stops_the_run_at_once():
    policy = UserMistakesAreFinal(FailureConfig(max_failures=3))
    mistake = failed(RuntimeError("gloo: connection reset"), UserFacingError("data.train_path row 7: no 'chosen'"))
    assert policy.make_decision(mistake) == FailureDecision.RAISE


def test_a_crashed_worker_is_still_retried_max_failures_times():
    policy = UserMistakesAreFinal(FailureConfig(max_failures=2))
    decisions = [policy.make_decision(failed(RuntimeError("worker died"))) for _ in range(3)]
    assert decisions == [FailureDecision.RETRY, FailureDecision.RETRY, FailureDecision.RAISE]
