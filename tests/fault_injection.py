"""Faults on purpose, for the fault-tolerance tests: :func:`installer` (behind the ``inject_fault``
fixture of conftest.py) puts one of these in the spec of the trainings a test starts
(``TrainSpec.after_step``), pickled by value, so the workers need not import this module; a user's
run calls no hook at all."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from trainers.state.storage import Storage


def installer(patch):
    """``install(hook)``: every training started after the call, while ``patch`` (a pytest
    MonkeyPatch) is active, gives its workers ``hook`` as ``TrainSpec.after_step`` (``None``: none
    again)."""
    import sys
    from dataclasses import replace

    import ray.cloudpickle

    from orchestrator.train import ResolvedRun

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    make_spec = ResolvedRun.spec

    def install(hook) -> None:
        patch.setattr(ResolvedRun, "spec", lambda run, *args, **kwargs: replace(make_spec(run, *args, **kwargs), after_step=hook))

    return install


@dataclass(frozen=True)
class KillOnce:
    """Worker ``rank`` SIGKILLs itself right after optimizer step ``step``, once: a marker file in
    the run's storage (``fault-injected-STEP-RANK``) keeps it to the first attempt."""

    step: int
    rank: int

    def __call__(self, run_uri: str, step: int, rank: int) -> None:
        if (step, rank) != (self.step, self.rank):
            return
        store, marker = Storage(run_uri), f"fault-injected-{step}-{rank}"
        if store.exists(marker):
            return
        store.write_text("killed", marker)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class UserMistakeAt:
    """Every worker raises a user's mistake (a ``UserFacingError``, like a bad row found late) after
    optimizer step ``step``; rank 0 counts the attempts that got there in ``user-mistake-attempts``."""

    step: int

    def __call__(self, run_uri: str, step: int, rank: int) -> None:
        from trainers.errors import UserFacingError

        if step != self.step:
            return
        if rank == 0:
            store = Storage(run_uri)
            seen = int(store.read_text("user-mistake-attempts")) if store.exists("user-mistake-attempts") else 0
            store.write_text(str(seen + 1), "user-mistake-attempts")
        raise UserFacingError(f"data.train_path row {step}: a mistake the user must fix")
