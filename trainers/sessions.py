"""How the training loop talks to whoever runs it: rank and world size, and reports (metrics and,
at checkpoint steps, this rank's part of the checkpoint).

* ``LocalSession``: no Ray (one process, or torchrun ranks): every rank copies its part into this
  attempt's directory of the run's checkpoints; rank 0 hands the metrics to a callback.
* ``RayTrainSession``: inside a Ray Train worker: every rank reports its directory through
  ``ray.train.report`` and Ray merges them into one checkpoint in this attempt's directory (Ray
  Train's run name is the attempt; Ray never deletes checkpoints: retention is ours).

Either way rank 0 then keeps the newest ``keep`` complete checkpoints of the run.

Which checkpoint to resume from is not the session's business: the loop finds the newest complete
one in the run's storage itself (``trainers.state.checkpoint.find_resume_checkpoint``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch.distributed as dist

from trainers.state.checkpoint import new_attempt, prune_checkpoints
from trainers.process_group import has_process_group, rank_and_world
from trainers.state.storage import Storage, raise_failed_upload


class Session(Protocol):
    rank: int
    world_size: int

    def report(self, metrics: dict, checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        """Called by every rank; ``checkpoint_dir`` holds this rank's part of checkpoint ``checkpoint_name``."""


class LocalSession:
    def __init__(self, on_report: Callable[[dict, str | None], None], checkpoints: Storage, keep: int = 2,
                 attempt: str | None = None):
        self.on_report, self.checkpoints, self.keep = on_report, checkpoints, keep
        distributed = has_process_group()
        self.rank, self.world_size = rank_and_world()
        if attempt is None:  # one name for all ranks of this launch
            attempt = [new_attempt()]
            if distributed:
                dist.broadcast_object_list(attempt, src=0)
            attempt = attempt[0]
        self.attempt = attempt

    def report(self, metrics: dict, checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        saved = None
        if checkpoint_dir is not None:
            self.checkpoints.put_dir(checkpoint_dir, self.attempt, checkpoint_name)
            if self.world_size > 1:
                dist.barrier()  # every rank's part is in place before rank 0 prunes older ones
            saved = self.checkpoints.uri_of(self.attempt, checkpoint_name)
            if self.rank == 0:
                prune_checkpoints(self.checkpoints, self.keep)
        if self.rank == 0:
            self.on_report(metrics, saved)


class RayTrainSession:
    def __init__(self, checkpoints: Storage, keep: int = 2):
        import ray.train

        self._train = ray.train
        self.checkpoints, self.keep = checkpoints, keep
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def report(self, metrics: dict, checkpoint_dir: Path | None = None, checkpoint_name: str | None = None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name)
        raise_failed_upload()  # Ray persisted the checkpoint through Storage.pyarrow, which hides it
        if checkpoint is not None and self.rank == 0:
            prune_checkpoints(self.checkpoints, self.keep)
