"""The one base class of errors a user can act on (a bad file, field, row, path, cluster...).

The CLI turns any of them into one line and a non-zero exit, never a traceback; every other
exception is a bug and keeps its traceback. It lives at the bottom of the package graph so that
trainers, evaluation and orchestrator can all raise them.

Raised inside a Ray worker, such an error reaches the driver wrapped: a task's or actor method's
``RayTaskError`` (its ``cause``), Ray Train's ``WorkerGroupError`` (``worker_failures``, by rank)
or ``ControllerError`` (``controller_failure``). :func:`user_facing_cause` finds it behind them.
"""

from __future__ import annotations


class UserFacingError(Exception):
    """Its message names what is wrong (file, field, row, address) and how to go on."""


def _is_ray_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "ray"


def user_facing_cause(exc: BaseException) -> UserFacingError | None:
    """``exc`` itself when it is a user's mistake, or the one Ray wrapped (the lowest rank's when
    several workers failed: the others fail because it did); None for anything else (a bug, or a
    worker that crashed), which must keep its traceback.

    Only Ray's wrappers are looked through, not ``__context__``: an exception raised while
    handling a user's mistake is a bug of its own."""
    queue: list = [exc]
    seen: set[int] = set()
    while queue:
        current = queue.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if not _is_ray_wrapper(current):
            if isinstance(current, UserFacingError):
                return current
            continue
        # A RayTaskError is also an instance of its cause's class; its text is a remote traceback.
        failures = getattr(current, "worker_failures", None) or {}
        queue += [getattr(current, "cause", None), getattr(current, "controller_failure", None),
                  *(failures[rank] for rank in sorted(failures)), current.__cause__]
    return None
