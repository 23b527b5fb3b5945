"""How each trial of a sweep ended, kept beside the sweep's Tune state."""

from __future__ import annotations

import json

from ray import tune

from trainers.state.storage import Storage


class TrialLedger(tune.Callback):
    """How each trial ended, from Tune's public callbacks, kept in the sweep's storage so that a
    ``--resume`` still knows the trials that ended before it.

    A result marked ``done`` is the end of a trial (its last step, or an ASHA stop), an error is an
    error; a trial that started and got neither was cut short by an interrupt."""

    FILE = "trials.json"

    def __init__(self, store: Storage):
        self.store = store
        self.trials: dict[str, dict] = {}

    def setup(self, **info) -> None:
        self.trials = json.loads(self.store.read_text(self.FILE)) if self.store.exists(self.FILE) else {}

    def _save(self) -> None:
        self.store.write_text(json.dumps(self.trials, indent=1), self.FILE)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        new = [t for t in trials if t.trial_id not in self.trials]
        for trial in new:  # every trial, started or not, with its sampled parameters
            self.trials[trial.trial_id] = {"config": trial.config, "state": "pending", "step": 0}
        if new:
            self._save()

    def _mark(self, trial, state: str, step: int | None = None, error: str | None = None) -> None:
        record = self.trials.setdefault(trial.trial_id, {"config": trial.config, "step": 0})
        record["state"] = state
        if step is not None:
            record["step"] = int(step)
        if error:
            record["error"] = error
        self._save()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._mark(trial, "running")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._mark(trial, "ended" if result.get("done") else "running", result.get("step"))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._mark(trial, "ended", (trial.last_result or {}).get("step"))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._mark(trial, "errored", (trial.last_result or {}).get("step"), error=f"trial {trial.trial_id} failed")

