"""The ways into the training loop besides calling :func:`trainers.loop.train` in-process: as a
Ray Train worker function, and under torchrun.

    torchrun --nproc-per-node N -m trainers.entrypoints exp.yaml --output-dir runs/x
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from trainers.config import DataConfig, ModelConfig, TokenizerConfig, TrainingConfig
from trainers.config import TrainSpec
from trainers.loop import CHECKPOINTS, train
from trainers.process_group import has_process_group
from trainers.sessions import LocalSession, RayTrainSession
from trainers.state.storage import Storage


def ray_train_worker(config: dict) -> None:
    """The ``train_loop_per_worker`` of the TorchTrainer: Ray has set up torch.distributed."""
    spec: TrainSpec = config["spec"]
    torch.set_num_threads(max(1, int(spec.training.resources_per_worker.CPU)))
    train(spec, RayTrainSession(Storage(spec.run_uri).child(CHECKPOINTS), spec.training.keep_checkpoints))


def torchrun_main(argv: list[str] | None = None) -> None:
    """``torchrun --nproc-per-node N -m trainers.entrypoints exp.yaml``: the loop without Ray. Rank 0
    prints one JSON line per logged step (``{"metrics": ...}``) and one per checkpoint
    (``{"checkpoint": uri, "step": N}``); the run's storage is --output-dir."""
    import argparse
    import json

    import yaml

    parser = argparse.ArgumentParser(description=torchrun_main.__doc__)
    parser.add_argument("config")
    parser.add_argument("--output-dir", default="trdpo_runs/torchrun", help="The run's storage (path or URI).")
    args = parser.parse_args(argv)
    tree = yaml.safe_load(Path(args.config).read_text())
    spec = TrainSpec(ModelConfig(**tree["model"]), TokenizerConfig(**tree.get("tokenizer", {})),
                     DataConfig(**tree["data"]), TrainingConfig(**tree["training"]), args.output_dir)
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")

    def on_report(metrics: dict, saved: str | None) -> None:
        if saved:
            print(json.dumps({"checkpoint": saved, "step": metrics["step"]}), flush=True)

    spec.step_logger = lambda metrics: print(json.dumps({"metrics": metrics}), flush=True)

    try:
        train(spec, LocalSession(on_report, Storage(args.output_dir).child(CHECKPOINTS), spec.training.keep_checkpoints))
    finally:
        if has_process_group():
            dist.destroy_process_group()


if __name__ == "__main__":
    torchrun_main()
