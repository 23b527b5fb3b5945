"""What trdpo relies on in Ray beyond its public API (private modules, internal environment
variables, Ray Train's SIGINT handling, the controller's failure policy that
``orchestrator.ray_trainer.DPOTrainer`` replaces), in one place;
``tests/unit/orchestrator/test_compat.py`` checks each against the installed Ray, so that an
upgrade that moves one fails there, by name.
Checked against ray 2.60.0 (``constraints.txt``); ``pyproject.toml`` keeps Ray below 3.
The torch side (distributed checkpoint internals) is :mod:`trainers.compat`.
"""

from __future__ import annotations

from typing import Callable

# Ray Train V2 settings read from the environment (ray.train.v2._internal.constants): not public,
# so each name is checked by the compat test. Values are what trdpo sets unless the user did.
RAY_TRAIN_ENV = {
    # Train V2 paces each report by its health-check poll (2 s by default). Reports happen only
    # at validation and checkpoint steps, so 0.5 s keeps them quick without eating a core.
    "HEALTH_CHECK_INTERVAL_S_ENV_VAR": ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    # Train V2 routes workers' print() through a logger *and* the console: every line twice.
    "ENABLE_PRINT_PATCH_ENV_VAR": ("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"),
    # Train's PreemptionWatcher polls for drained nodes (reclaimed cloud instances): one more
    # process to start with every worker group, and nothing to watch on this machine's Ray.
    "ENABLE_PREEMPTION_WATCHER_ENV_VAR": ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
}


def route_relayed_output(route: Callable[[dict, Callable[[dict], None]], None]) -> None:
    """From the next ``ray.init`` on, every batch of output that Ray relays to this driver goes to
    ``route(batch, show)`` instead of straight to the console; ``show(batch)`` prints a batch the
    way Ray would (prefix, colours, deduplication). A batch is a dict with ``lines``, ``pid``
    (or "raylet"/"autoscaler"), ``actor_name``/``task_name`` and ``is_err``.

    Ray prints both the workers' output (``log_to_driver``) and the cluster's error messages
    through ``ray._private.worker.print_to_stdstream``; ``ray.init`` binds the former when it
    connects, so this must run before ``ray.init``. Calling it again replaces the route."""
    from ray._private import worker

    original = getattr(worker.print_to_stdstream, "trdpo_original", worker.print_to_stdstream)

    def routed(data: dict, ignore_prefix: bool) -> None:
        route(data, lambda batch: original(batch, ignore_prefix))

    routed.trdpo_original = original
    worker.print_to_stdstream = routed


def relayed_output_routed() -> bool:
    """Whether :func:`route_relayed_output` is in place."""
    from ray._private import worker

    return hasattr(worker.print_to_stdstream, "trdpo_original")


def off_main_thread(fn):
    """``fn()`` in a helper thread while this (main) thread waits for it.

    Ray Train installs its own SIGINT handler when fit() runs on the main thread (and only then:
    checked by the compat test); it aborts the run and leaves with ``sys.exit(0)``, so a Ctrl-C
    looked like a failure (the MLflow run ended FAILED, trdpo said nothing). Off the main thread Ray installs none: Ctrl-C is an ordinary
    KeyboardInterrupt here, the MLflow run ends KILLED, the CLI says how to resume, and the
    workers stop with the driver (their owner)."""
    import threading

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="trdpo-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
