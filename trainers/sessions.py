"""How the training loop talks to whoever runs it: rank and world size, reports (metrics and,
at checkpoint steps, a directory to keep), and the checkpoint to resume from.

* ``LocalSession``: no Ray (one process, or torchrun ranks); rank 0 keeps the last K checkpoints.
* ``RayTrainSession``: inside a Ray Train worker; reports go through ``ray.train.report``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol

import torch.distributed as dist


class Session(Protocol):
    """How the loop talks to its runner: rank/world, reports, and the checkpoint to resume from."""

    rank: int
    world_size: int

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None: ...

    def resume_dir(self) -> Path | None: ...


class LocalSession:
    """Runner without Ray (one process, or torchrun ranks): reports go to a callback on rank 0;
    checkpoints are copied to ``checkpoint_root`` by rank 0."""

    def __init__(self, on_report, checkpoint_root: Path, keep: int = 2, resume_from: Path | None = None):
        self.on_report, self.root, self.keep, self._resume = on_report, Path(checkpoint_root), keep, resume_from
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.checkpoints: list[Path] = sorted(self.root.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if self.root.exists() else []

    def resume_dir(self) -> Path | None:
        if self._resume is not None:
            return self._resume
        return self.checkpoints[-1] if self.checkpoints else None

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        import shutil

        if self.rank != 0:
            return
        saved = None
        if checkpoint_dir is not None:
            saved = self.root / f"step_{metrics['step']:08d}"
            shutil.copytree(checkpoint_dir, saved, dirs_exist_ok=True)
            self.checkpoints.append(saved)
            while len(self.checkpoints) > self.keep:
                shutil.rmtree(self.checkpoints.pop(0), ignore_errors=True)
        self.on_report(metrics, saved)


class RayTrainSession:
    """Runner inside a Ray Train worker: rank from the train context, reports and checkpoints
    through ``ray.train.report`` (rank 0 attaches the checkpoint; every rank must call it)."""

    def __init__(self):
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self._restore_tmp: tempfile.TemporaryDirectory | None = None

    def resume_dir(self) -> Path | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restore_tmp = tempfile.TemporaryDirectory()
        return Path(checkpoint.to_directory(self._restore_tmp.name))

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)
