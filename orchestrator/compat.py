"""Private APIs of Ray that trdpo relies on, in one place; ``tests/unit/orchestrator/test_compat.py``
checks each against the installed Ray, so that an upgrade that moves one fails there, by name.
"""

from __future__ import annotations

from typing import Callable


def node_ip_address() -> str:
    """This machine's address as Ray names it (the GCS address of a local Ray is built from it)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


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
