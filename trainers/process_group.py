"""This process's place among the training ranks, asked in one place: is there a process group,
are there several ranks, which rank is this; and a free local port for a group's rendezvous."""

from __future__ import annotations

import socket

import torch.distributed as dist


def has_process_group() -> bool:
    """A torch process group exists (possibly of one rank: a 1-rank mesh still shards)."""
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True when this process is one of several ranks (FSDP has something to shard over)."""
    return has_process_group() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if has_process_group():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it), for a rendezvous or a dashboard."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
