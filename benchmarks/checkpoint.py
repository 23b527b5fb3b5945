"""Checkpoint save and load: full state gathered to rank 0 (the old way) vs sharded DCP.

    python benchmarks/checkpoint.py            # Pythia-410M architecture (405M parameters), 2 ranks
    python benchmarks/checkpoint.py --quick    # a tiny GPT-NeoX (the test suite runs this)

On 2 gloo ranks, after one TR-DPO step (so AdamW state exists), the training state (policy,
reference, AdamW) is saved and loaded back three ways, each timed, with rank 0's peak resident
memory above its level before the operation (a 5 ms sampling thread):

* full: policy, reference and optimizer gathered to full tensors on rank 0's CPU, one
  ``torch.save`` by rank 0; loading: every rank ``torch.load``s the whole file and keeps its shards
  (what the previous ``state.pt`` checkpoints did);
* sharded: ``trainers.state.checkpoint.save_checkpoint`` (every rank writes its own shards with DCP) and
  ``load_checkpoint`` (every rank reads only its slices);
* async: ``torch.distributed.checkpoint.async_save`` of the same state: the time training is
  blocked (staging the shards to CPU) vs the time until the files are written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from memory import MB, PeakRSS, data_config, free_port, save_model, training_config  # noqa: E402

from trainers.config import ModelConfig, TokenizerConfig  # noqa: E402


def measure(probe: PeakRSS, fn) -> tuple[float, float]:
    """(seconds, peak MB above the level before) of ``fn()``, with the ranks in step."""
    dist.barrier()
    before = probe.process.memory_info().rss
    probe.peak = before
    started = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - started, (probe.read() - before) / MB


def worker(rank: int, world: int, port: int, model_dir: str, quick: bool, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    from trainers.state.checkpoint import load_checkpoint, save_checkpoint
    from trainers.data.batching import collate_pairs
    from trainers.data.loading import load_examples, tokenize_examples
    from trainers.model.sharding import build_models
    from trainers.optimizer import make_optimizer, make_scheduler
    from trainers.model.build import build_tokenizer
    from trainers.sessions import LocalSession
    from trainers.state.storage import Storage
    from trainers.model.scoring import Scorer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    probe = PeakRSS()
    model_cfg = ModelConfig(name_or_path=model_dir)
    tokenizer = build_tokenizer(model_cfg, TokenizerConfig(name_or_path=model_dir))
    models = build_models(model_cfg, tokenizer, preference=True, moving_reference=False, device=torch.device("cpu"), bf16=False)
    training, data = training_config(quick), data_config(quick)
    optimizer = make_optimizer(models.policy, training)
    scheduler = make_scheduler(optimizer, training, 10)
    examples, _ = load_examples(data.model_copy(update={"synthetic": data.synthetic.model_copy(update={"num_pairs": 8})}))
    batch = collate_pairs(tokenize_examples(examples, tokenizer, data, "synthetic", None)[rank : rank + 1], tokenizer.pad_token_id)
    (-Scorer(models.policy, training, bf16=False).sequence_logps(batch, average=False)[0].sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    full_options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_file = Path(out) / "state.pt"
    results: dict[str, float] = {}

    def full_save() -> None:
        state = {"policy": get_model_state_dict(models.policy, options=full_options),
                 "reference": get_model_state_dict(models.reference, options=full_options),
                 "optimizer": get_optimizer_state_dict(models.policy, optimizer, options=full_options)}
        if rank == 0:
            torch.save(state, full_file)

    def full_load() -> None:
        state = torch.load(full_file, map_location="cpu", weights_only=False)
        set_model_state_dict(models.policy, state["policy"], options=full_options)
        set_model_state_dict(models.reference, state["reference"], options=full_options)
        set_optimizer_state_dict(models.policy, optimizer, state["optimizer"], options=full_options)

    store = Storage(Path(out) / "sharded")
    session = LocalSession(lambda m, s: None, store, keep=2, attempt="attempt-bench")

    def sharded_save() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), policy=models.policy, reference=models.reference, optimizer=optimizer,
                            scheduler=scheduler, updater_state={}, step=1, rank=rank, world=world)
            session.report({"step": 1}, Path(tmp), "step_00000001")

    def sharded_load() -> None:
        load_checkpoint(store, "attempt-bench/step_00000001", policy=models.policy, reference=models.reference,
                        optimizer=optimizer, scheduler=scheduler, rank=rank)

    for name, fn in (("full_save", full_save), ("full_load", full_load), ("sharded_save", sharded_save),
                     ("sharded_load", sharded_load)):
        seconds, peak = measure(probe, fn)
        results[f"{name}_s"], results[f"{name}_peak_mb"] = seconds, peak

    import torch.distributed.checkpoint as dcp

    state = {"policy": get_model_state_dict(models.policy), "reference": get_model_state_dict(models.reference),
             "optimizer": get_optimizer_state_dict(models.policy, optimizer)}
    dist.barrier()
    started = time.perf_counter()
    future = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(str(Path(out) / f"async-{rank}")))
    results["async_blocked_s"] = time.perf_counter() - started
    future.result()
    results["async_total_s"] = time.perf_counter() - started
    dist.barrier()
    started = time.perf_counter()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(Path(out) / f"sync-{rank}")))
    results["sync_dcp_s"] = time.perf_counter() - started
    probe.stop()
    Path(out, f"checkpoint-{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A tiny model: checks the script, measures nothing of note.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trdpo-bench-ckpt-") as tmp:
        model_dir = save_model(args.quick, Path(tmp) / "model")
        mp.spawn(worker, args=(2, free_port(), str(model_dir), args.quick, tmp), nprocs=2, join=True)
        ranks = [json.loads(Path(tmp, f"checkpoint-{r}.json").read_text()) for r in range(2)]
    r0 = ranks[0]
    print("rank 0 (seconds, peak MB above the level before):")
    for kind in ("full", "sharded"):
        print(f"  {kind:<8} save {r0[f'{kind}_save_s']:6.2f} s {r0[f'{kind}_save_peak_mb']:8.0f} MB   "
              f"load {r0[f'{kind}_load_s']:6.2f} s {r0[f'{kind}_load_peak_mb']:8.0f} MB")
    ratios = {f"{op}_{what}": r0[f"sharded_{op}_{what}"] / max(r0[f"full_{op}_{what}"], 1e-9)
              for op in ("save", "load") for what in ("s", "peak_mb")}
    print("sharded / full: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"async_save: training blocked {r0['async_blocked_s']:.2f} s of {r0['async_total_s']:.2f} s "
          f"(a plain DCP save takes {r0['sync_dcp_s']:.2f} s)")
    return {"ranks": ranks, "ratios": ratios}


if __name__ == "__main__":
    main()
