"""trdpo's TorchTrainer and the failure policy its controller runs.

Ray Train's controller is a process of its own that unpickles the failure policy, and with it
this module: so it imports Ray Train and trainers.errors only. Were these classes in
orchestrator.ray_train, every controller would import MLflow, the training loop and
torch.distributed.checkpoint for nothing (about 2 CPU-seconds per launch).
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import TrainingFailedError

from trainers.errors import user_facing_cause


class UserMistakesAreFinal(DefaultFailurePolicy):
    """Ray Train's failure policy, except that a user's mistake (a bad row, field or path, raised
    as a :class:`UserFacingError` on any worker) stops the run at once: a restart from the last
    checkpoint would meet the same mistake, ``training.max_failures`` times over."""

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if user_facing_cause(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class DPOTrainer(TorchTrainer):
    """A TorchTrainer whose controller uses :class:`UserMistakesAreFinal`, and starts no Ray Data
    actor. Ray Train 2.60 takes no failure policy in its public API; the controller's arguments
    are the one place to set it. Its DatasetsCallback starts a DatasetManager actor with every
    worker group even when no Ray Dataset is passed (the workers read their data themselves): one
    more process per attempt, about 2 CPU-seconds of imports, serving nothing."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = UserMistakesAreFinal(self.run_config.failure_config)
        if not self.datasets:
            controller_init_kwargs["callbacks"] = [c for c in controller_init_kwargs["callbacks"]
                                                   if not isinstance(c, DatasetsCallback)]
        return super()._initialize_and_run_controller(**controller_init_kwargs)
