"""Peak host memory: load-once vs eager start-up per rank, and `trdpo plan` against measured peaks.

    python benchmarks/memory.py [startup] [--quick]   # Pythia-410M architecture (405M parameters), random weights, 2 ranks
                                                      # (--quick: a tiny model, both modes in one launch: checks the script)
    python benchmarks/memory.py plan [--quick]        # plan vs measured peak for several shapes (below)

``plan``: for each shape (two families, two sequence lengths, with and without activation
checkpointing, chunked and whole logits, fp32 and bf16) a short TR-DPO training runs in its own process (one
worker, packed micro-batches of HH-like long-tailed lengths, word-level tokenizer at the
model's vocabulary); a thread samples its RSS every 5 ms. Measured: the peak above the RSS just
before the models are built (runtime and tokenized data excluded, as in the plan). Planned:
``trdpo plan``'s total, with the micro-batch size read from the same data. Printed: both and
their ratio per shape (target: within ±20% on CPU).

``startup`` (the default):

Both modes run on 2 gloo ranks (one process each) over the same saved model, in separate launches
(peak RSS only grows within a process):

* eager (before this change): every rank reads the full model three times (policy, reference,
  frozen initial model), then shards each with FSDP2;
* meta (now, trainers.model.sharding.build_models): every rank builds skeletons on the meta device,
  rank 0 alone reads the weights once and broadcasts them into the policy's shards; reference and
  initial model are shard-local copies.

Then two TR-DPO steps (AdamW, a DPO loss on a fixed batch). A thread samples each rank's RSS
every 5 ms. Printed: peak RSS per rank after start-up and after training, the ratios meta/eager,
each rank's measured model-state bytes (parameters, gradients, AdamW state, reference, initial)
beside `trdpo plan`'s figure for the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainers.config import DataConfig, LoraConfig, ModelConfig, TokenizerConfig, TrainingConfig  # noqa: E402
from trainers.process_group import free_port  # noqa: E402  (benchmarks/checkpoint.py imports it from here)

MB = 2**20


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` since start or reset."""

    def __init__(self, interval_s: float = 0.005):
        self.process, self.interval, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def read(self) -> int:
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak

    def reset(self) -> int:
        """Start a new peak from now; returns the current RSS."""
        self.peak = self.process.memory_info().rss
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def save_model(quick: bool, directory: Path) -> Path:
    from trainers.fsdp_check import save_tiny_family
    from trainers.model.memory import known_architecture
    from trainers.model.build import make_byte_tokenizer

    if quick:
        return save_tiny_family("gpt_neox", directory)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = known_architecture("EleutherAI/pythia-410m")
    config.vocab_size = 50304
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    make_byte_tokenizer().save_pretrained(directory)
    return directory


def training_config(quick: bool) -> TrainingConfig:
    return TrainingConfig(ref_update="soft", alpha=0.6, tau=1, learning_rate=1e-5, per_device_batch_size=1, max_steps=2,
                          num_workers=2, precision="fp32", weight_decay=0.0)


def data_config(quick: bool) -> DataConfig:
    return DataConfig(format="synthetic", max_length=32 if quick else 64, max_prompt_length=16)


def eager_models(model_cfg: ModelConfig, tokenizer, device: torch.device):
    """The old start-up: three full reads of the model on every rank, then sharding."""
    from torch.distributed.device_mesh import init_device_mesh

    from trainers.model.sharding import Models, shard
    from trainers.model.build import build_policy

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy, reference, initial = (build_policy(model_cfg, tokenizer) for _ in range(3))
    for model in (policy, reference, initial):
        shard(model, mesh, bf16=False)
    for frozen in (reference, initial):
        frozen.requires_grad_(False).eval()
    return Models(policy, reference, initial)


def worker(rank: int, world: int, port: int, mode: str, model_dir: str, quick: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    probe = PeakRSS()
    from trainers.data.batching import collate_pairs
    from trainers.data.loading import load_examples, tokenize_examples
    from trainers.model.sharding import build_models, local_tensors
    from trainers.optimizer import make_optimizer
    from trainers.model.build import build_tokenizer
    from trainers.model.scoring import Scorer
    from trainers.step_metrics import model_state_bytes
    from trainers.trdpo import PreferenceLogps, preference_loss, soft_update_

    model_cfg, tokenizer_cfg = ModelConfig(name_or_path=model_dir), TokenizerConfig(name_or_path=model_dir)
    tokenizer = build_tokenizer(model_cfg, tokenizer_cfg)
    import transformers  # noqa: F401 - the runtime, imported before the baseline is read

    device = torch.device("cpu")
    baseline = probe.process.memory_info().rss  # the bare runtime: torch, transformers, a process group
    started = time.perf_counter()
    if mode == "eager":
        models = eager_models(model_cfg, tokenizer, device)
    else:
        models = build_models(model_cfg, tokenizer, preference=True, moving_reference=True, device=device, bf16=False)
    dist.barrier()
    startup_s, startup_peak = time.perf_counter() - started, probe.read()
    shards = sum(t.numel() * t.element_size() for m in (models.policy, models.reference, models.initial) for t in local_tensors(m))

    training, data = training_config(quick), data_config(quick)
    examples, _ = load_examples(data.model_copy(update={"synthetic": data.synthetic.model_copy(update={"num_pairs": 8})}))
    pairs = tokenize_examples(examples, tokenizer, data, "synthetic", None)
    optimizer = make_optimizer(models.policy, training)
    policy, reference = Scorer(models.policy, training, bf16=False), Scorer(models.reference, training, bf16=False)
    for step in range(training.max_steps):
        batch = collate_pairs(pairs[rank : rank + 1], tokenizer.pad_token_id)
        scores = policy.sequence_logps(batch, average=False)[0]
        with torch.no_grad():
            ref = reference.sequence_logps(batch, average=False)[0]
        preference_loss("sigmoid", PreferenceLogps(scores[:1], scores[1:], ref[:1], ref[1:]), 0.1, 0.0).loss.backward()
        optimizer.step()
        if step == 0:
            state = model_state_bytes([models.policy, models.reference, models.initial], optimizer)
        optimizer.zero_grad(set_to_none=True)
        soft_update_(local_tensors(models.reference), local_tensors(models.policy), 0.6)
    train_peak = probe.read()
    probe.stop()
    record = {"rank": rank, "mode": mode, "baseline_mb": baseline / MB, "startup_peak_mb": startup_peak / MB,
              "train_peak_mb": train_peak / MB, "startup_s": startup_s, "model_state_bytes": state, "shard_mb": shards / MB}
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def quick_worker(rank: int, world: int, ports: tuple[int, int], model_dir: str, out: str) -> None:
    """--quick: eager then meta in the same process per rank, one launch instead of two (the peaks
    of the second mode include the first's; the quick numbers mean nothing)."""
    for mode, port in zip(("eager", "meta"), ports):
        worker(rank, world, port, mode, model_dir, True, out)


# ------------------------------------------------------------------------- plan vs measured


@dataclass(frozen=True)
class Shape:
    name: str
    family: str
    model: dict
    max_length: int
    batch: int
    checkpointing: bool = False
    chunk: int | None = 1024
    packing: bool = True
    precision: str = "fp32"
    lora: bool = False  # rank 16 on every linear layer of the blocks, fp32 base (model.lora)


NEOX = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048, rotary_pct=0.25,
            use_parallel_residual=True, tie_word_embeddings=False, vocab_size=50304, max_position_embeddings=2048)
LLAMA = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1536,
             vocab_size=32000, max_position_embeddings=2048)
NEOX8 = dict(NEOX, num_hidden_layers=8)
SHAPES = [
    Shape("gpt_neox L512", "gpt_neox", NEOX, max_length=512, batch=4),
    Shape("gpt_neox L512 checkpointing", "gpt_neox", NEOX, max_length=512, batch=4, checkpointing=True),
    Shape("gpt_neox L128", "gpt_neox", NEOX, max_length=128, batch=8),
    Shape("gpt_neox L512 whole logits", "gpt_neox", NEOX, max_length=512, batch=4, chunk=None),
    Shape("gpt_neox L256 padded, whole", "gpt_neox", NEOX, max_length=256, batch=4, chunk=None, packing=False),
    Shape("gpt_neox L512 bf16", "gpt_neox", NEOX, max_length=512, batch=4, precision="bf16"),
    Shape("llama L512", "llama", LLAMA, max_length=512, batch=4),
    Shape("llama L128 checkpointing", "llama", LLAMA, max_length=128, batch=8, checkpointing=True),
    Shape("gpt_neox 8x512 L512 full", "gpt_neox", NEOX8, max_length=512, batch=8),
    Shape("gpt_neox 8x512 L512 LoRA", "gpt_neox", NEOX8, max_length=512, batch=8, lora=True),
]
LORA_PAIR = ("gpt_neox 8x512 L512 full", "gpt_neox 8x512 L512 LoRA")  # `lora`: the same run, full and LoRA
QUICK_SHAPES = [Shape("gpt_neox quick", "gpt_neox", dict(NEOX, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=128, vocab_size=4096), max_length=128, batch=2)]


def shape_inputs(shape: Shape, directory: Path) -> tuple[ModelConfig, TokenizerConfig, DataConfig, TrainingConfig]:
    """The model (saved once per shape), HH-like data at its vocabulary, and the training settings."""
    import transformers

    from trainers.model.build import make_word_tokenizer
    from trainers.data.synthetic import HH_LIKE, length_profile_texts

    model_dir = directory / "model"
    if not (model_dir / "config.json").exists():
        tokenizer = make_word_tokenizer(shape.model["vocab_size"])
        config_class = transformers.GPTNeoXConfig if shape.family == "gpt_neox" else transformers.LlamaConfig
        config = config_class(pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape.model)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        scale = shape.max_length / 512
        profile = HH_LIKE.__class__(HH_LIKE.prompt_median * scale, HH_LIKE.prompt_sigma, HH_LIKE.response_median * scale,
                                    HH_LIKE.response_sigma)
        half = shape.max_length // 2
        rows = length_profile_texts(200, 0, profile, half, shape.max_length - half - 1,
                                    word=lambda rng: f"w{rng.randrange(4, shape.model['vocab_size'])}", separator=" ")
        (directory / "data.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                                      for p, c, r in rows))
    model = ModelConfig(name_or_path=str(model_dir), lora=LoraConfig(rank=16, alpha=32) if shape.lora else None)
    data = DataConfig(format="preference", path=str(directory / "data.jsonl"), max_length=shape.max_length,
                      max_prompt_length=shape.max_length // 2, validation_fraction=0.02)
    training = TrainingConfig(ref_update="soft", alpha=0.6, tau=1, learning_rate=1e-5, per_device_batch_size=shape.batch,
                              max_steps=3, num_workers=1, precision=shape.precision, activation_checkpointing=shape.checkpointing,
                              logprob_chunk_tokens=shape.chunk, packing=shape.packing, log_every=1, seed=0)
    return model, TokenizerConfig(name_or_path=str(model_dir)), data, training


def measure_shape(index: int, quick: bool, directory: str) -> None:
    """One training in this process; prints the peak RSS above the level before the models were built."""
    from trainers import loop
    from trainers.sessions import LocalSession
    from trainers.state.storage import Storage

    torch.set_num_threads(2)
    shape = (QUICK_SHAPES if quick else SHAPES)[index]
    model, tokenizer, data, training = shape_inputs(shape, Path(directory))
    cuda = torch.cuda.is_available()
    probe = None if cuda else PeakRSS()
    before = {}

    def build_models(*args, **kwargs):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before["rss"] = torch.cuda.memory_allocated()
        else:
            before["rss"] = probe.reset()
        return original_build(*args, **kwargs)

    def step_logger(metrics: dict) -> None:  # the last step's validation included; the final save and export not
        before.setdefault("stamps", []).append(time.perf_counter())
        if metrics["step"] == training.max_steps:
            before["peak"] = torch.cuda.max_memory_allocated() if cuda else probe.read()
            before["model_state_mb"] = metrics["system/model_state_mb_rank0"]

    original_build, loop.build_models = loop.build_models, build_models
    with tempfile.TemporaryDirectory(prefix="trdpo-bench-") as out:
        spec = loop.TrainSpec(model, tokenizer, data, training, out, step_logger=step_logger)
        loop.train(spec, LocalSession(lambda metrics, saved: None, Storage(out).child(loop.CHECKPOINTS), keep=1))
    stamps = before["stamps"]
    print("RESULT " + json.dumps({"measured": before["peak"] - before["rss"], "model_state_mb": before["model_state_mb"],
                                  "step_s": (stamps[-1] - stamps[0]) / (len(stamps) - 1)}), flush=True)


def plan_vs_measured(quick: bool, only: str | None = None) -> dict:
    from trainers.model.memory import data_shape, plan_memory, plan_skeleton

    results, records = {}, {}
    for index, shape in enumerate(QUICK_SHAPES if quick else SHAPES):
        if only and only not in shape.name:
            continue
        with tempfile.TemporaryDirectory(prefix="trdpo-bench-plan-") as tmp:
            model, tokenizer, data, training = shape_inputs(shape, Path(tmp))
            micro, _ = data_shape(model, tokenizer, data, training)
            plan = plan_memory(plan_skeleton(model, None), data, training, bf16=shape.precision == "bf16", shape=micro,
                               lora=model.lora)
            done = subprocess.run([sys.executable, __file__, "_measure", str(index), "--dir", tmp] + (["--quick"] if quick else []),
                                  capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{shape.name} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            record = json.loads(lines[-1].removeprefix("RESULT "))
            measured = record["measured"]
        results[shape.name] = plan.total / measured
        records[shape.name] = record
        print(f"{shape.name:<28} micro-batch {micro.positions:5d} positions: plan {plan.total / MB:7.0f} MB (states "
              f"{plan.model_states / MB:.0f}, activations {plan.activations / MB:.0f}, logits {plan.logits / MB:.0f}), "
              f"measured {measured / MB:7.0f} MB, plan/measured {plan.total / measured:.3f}", flush=True)
    worst = max(results.values(), key=lambda r: abs(r - 1))
    print(f"plan/measured over {len(results)} shapes: {min(results.values()):.3f} .. {max(results.values()):.3f}; "
          f"worst {worst:.3f} (target within 0.8 .. 1.2)")
    full, lora = (records.get(name) for name in LORA_PAIR)
    if full and lora:
        print(f"LoRA / full TR-DPO (soft, same micro-batch, one worker): peak step memory "
              f"{lora['measured'] / full['measured']:.3f}x (target <= 0.45), model state "
              f"{lora['model_state_mb'] / full['model_state_mb']:.3f}x (target <= 0.3), step time "
              f"{lora['step_s'] / full['step_s']:.3f}x")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=["startup", "plan", "_measure"], default="startup")
    parser.add_argument("index", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="A tiny model: checks the script, measures nothing of note.")
    parser.add_argument("--only", help="plan: only the shapes whose name contains this.")
    args = parser.parse_args(argv)
    if args.what == "plan":
        return plan_vs_measured(args.quick, args.only)
    if args.what == "_measure":
        measure_shape(args.index, args.quick, args.dir)
        return {}
    from trainers.model.memory import plan_memory, plan_skeleton

    with tempfile.TemporaryDirectory(prefix="trdpo-bench-memory-") as tmp:
        model_dir = save_model(args.quick, Path(tmp) / "model")
        params = sum(p.numel() for p in plan_skeleton(ModelConfig(name_or_path=str(model_dir)), None).parameters())
        print(f"model: {params / 1e6:.1f}M parameters, fp32 safetensors in {model_dir}", flush=True)
        records = {}
        if args.quick:
            ports = (free_port(), free_port())
            while ports[1] == ports[0]:
                ports = (ports[0], free_port())
            mp.spawn(quick_worker, args=(2, ports, str(model_dir), tmp), nprocs=2, join=True)
        for mode in ("eager", "meta"):
            if not args.quick:
                mp.spawn(worker, args=(2, free_port(), mode, str(model_dir), args.quick, tmp), nprocs=2, join=True)
            records[mode] = [json.loads(Path(tmp, f"{mode}-{r}.json").read_text()) for r in range(2)]
        plan = plan_memory(plan_skeleton(ModelConfig(name_or_path=str(model_dir)), None), data_config(args.quick),
                           training_config(args.quick), bf16=False)
    full_model_mb = params * 4 / MB
    print(f"\none full fp32 model = {full_model_mb:.0f} MB; peak RSS per rank (MB), start-up | after 2 steps:")
    for mode, ranks in records.items():
        shown = "   ".join(f"rank {r['rank']}: {r['startup_peak_mb']:7.0f} | {r['train_peak_mb']:7.0f}" for r in ranks)
        print(f"  {mode:<5}  {shown}   (start-up {ranks[0]['startup_s']:.1f} s)")
    ratios = {}
    for rank in range(2):
        for phase in ("startup_peak_mb", "train_peak_mb"):
            ratios[f"rank{rank}_{phase}"] = records["meta"][rank][phase] / records["eager"][rank][phase]
    print("meta / eager: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    for mode, ranks in records.items():
        for r in ranks:
            # What a rank held at its start-up peak beyond the runtime and its own shards of the
            # three models: copies of full models (or parts of them) that sharding made unnecessary.
            extra = r["startup_peak_mb"] - r["baseline_mb"] - r["shard_mb"]
            print(f"{mode:<5} rank {r['rank']}: start-up peak = runtime {r['baseline_mb']:.0f} + own shards "
                  f"{r['shard_mb']:.0f} + {extra:.0f} MB more ({extra / full_model_mb:.2f} full models)")
    measured = records["meta"][0]["model_state_bytes"]
    print(f"model states of rank 0: measured {measured / MB:.1f} MB, trdpo plan {plan.model_states / MB:.1f} MB "
          f"(plan/measured {plan.model_states / measured:.4f})")
    return {"records": records, "ratios": ratios, "plan_model_states": plan.model_states, "full_model_mb": full_model_mb}


if __name__ == "__main__":
    main()
