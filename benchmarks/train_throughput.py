"""Training throughput, each as a ratio against a baseline measured in the same run.

    python benchmarks/train_throughput.py trl   [--quick]   # (a) our loop vs TRL DPOTrainer(sync_ref_model=True), one process
    python benchmarks/train_throughput.py ray   [--quick]   # (b) Ray Train with 1 worker vs the plain loop, >= 60 s each

(Per-worker memory: benchmarks/memory.py.)

(a) needs TRL: pip install -e ".[bench]" (or ".[dev]"). Both sides train the same model (~11M-parameter
Llama, byte tokenizer) on the same synthetic pairs, in this process, with every setting that
differs by default pinned to one value and printed (see SETTINGS below and `pinned_settings`):
precision, gradient checkpointing, optimizer implementation, weight decay, betas, gradient
clipping, warmup and scheduler, batch, lengths, loss, reference update, threads. Each comparison
runs with activation checkpointing off on both sides (our default) and again with it on on both
sides (TRL 1.16's default). The optimizer each side actually built, its checkpointing and its
precision are read back after training and must match, or the run fails.

A step's time is measured between rank 0's hooks at the end of consecutive steps (ours:
``TrainSpec.step_logger``, called at every logged step; TRL: a ``TrainerCallback.on_step_end``
registered after TRL's own reference-sync callback), from the end of step 1 to the end of step
N-1: no warm-up step, no final validation or save. Both sides train the same pairs in the same
batches and order (TRL is given our loop's sequence with a sequential sampler), so step k is the
same work on each side; the sides take turns (``--repeats``) and each step's fastest repeat counts,
which filters out moments when another process had the CPU.

``--quick``: a tiny model, a few steps, every comparison: checks the script runs end to end and
prints its ratio lines; the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainers.config import DataConfig, ModelConfig, TinyModelConfig, TokenizerConfig, TrainingConfig  # noqa: E402


@dataclass(frozen=True)
class Bench:
    model: TinyModelConfig
    batch: int  # pairs per step (chosen and rejected in one forward of 2 x batch rows, both sides)
    max_length: int
    max_prompt_length: int
    num_pairs: int
    steps: int
    tau: int
    alpha: float = 0.6
    beta: float = 0.1
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 42


FULL = Bench(TinyModelConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1024, max_position_embeddings=128),
             batch=8, max_length=96, max_prompt_length=32, num_pairs=4000, steps=40, tau=4)
QUICK = Bench(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128),
              batch=2, max_length=96, max_prompt_length=32, num_pairs=48, steps=5, tau=2)


def pinned_settings(b: Bench, precision: str, checkpointing: bool, threads: int) -> dict[str, str]:
    """Every setting that differs between our loop's and TRL 1.16's defaults, as both sides run it."""
    return {
        "precision": "bf16 autocast, fp32 master weights" if precision == "bf16" else "fp32 (TRL's bf16=True default off)",
        "gradient checkpointing": ("on both sides: ours training.activation_checkpointing, TRL gradient_checkpointing "
                                   "(non-reentrant both)") if checkpointing
        else "off both sides (TRL 1.16 defaults it on)",
        "optimizer": "torch.optim.AdamW, default implementation (TRL optim='adamw_torch', not transformers 5's "
                     "default 'adamw_torch_fused')",
        "weight decay": "0.0", "betas / eps": "(0.9, 0.999) / 1e-8", "gradient clipping": f"max norm {b.max_grad_norm}",
        "learning rate": f"{b.learning_rate:g}, constant, 0 warmup steps",
        "batch": f"{b.batch} pairs per step, no accumulation, 1 process",
        "lengths": f"max_length {b.max_length}, max_prompt_length {b.max_prompt_length} (no pair is truncated either side)",
        "loss": f"sigmoid DPO, beta {b.beta}, summed log-probs, no dropout",
        "reference update": f"soft, alpha {b.alpha} every {b.tau} steps (TRL sync_ref_model=True)",
        "data": "the same pairs in the same batches and order on both sides (our loop's seeded order; TRL is given "
                "that sequence with train_sampling_strategy='sequential')",
        "threads": f"{threads} torch threads, dataloader in-process (0 workers)",
        "logging": "ours: metrics every step (the step hook); TRL: logging_steps > max_steps, no progress bar",
    }


def step_times(stamps: dict[int, float], b: Bench) -> dict[int, float]:
    """Seconds of steps 2..N-1, each from the end of the step before to its own end."""
    missing = [s for s in range(1, b.steps) if s not in stamps]
    if missing:
        raise RuntimeError(f"no timestamp for step(s) {missing}; got {sorted(stamps)}")
    return {s: stamps[s] - stamps[s - 1] for s in range(2, b.steps)}


def pairs_per_s(times: dict[int, float], b: Bench) -> float:
    return len(times) * b.batch / sum(times.values())


def describe_adamw(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    decays = sorted({g["weight_decay"] for g in optimizer.param_groups})
    return f"{type(optimizer).__module__}.{type(optimizer).__name__}(foreach={d.get('foreach')}, fused={d.get('fused')}, " \
           f"betas={tuple(d['betas'])}, eps={d['eps']}, weight_decay={decays})"


def training_config(b: Bench, precision: str = "fp32", checkpointing: bool = False) -> TrainingConfig:
    return TrainingConfig(
        ref_update="soft", alpha=b.alpha, tau=b.tau, beta=b.beta, loss="sigmoid", average_log_prob=False,
        learning_rate=b.learning_rate, weight_decay=0.0, adam_betas=(0.9, 0.999), lr_scheduler="constant", warmup_steps=0,
        max_grad_norm=b.max_grad_norm, per_device_batch_size=b.batch, gradient_accumulation_steps=1, max_steps=b.steps,
        num_workers=1, log_every=1, eval_every=None, checkpoint_every=None, keep_checkpoints=1, precision=precision,
        activation_checkpointing=checkpointing, seed=b.seed)


def data_config(b: Bench) -> DataConfig:
    return DataConfig(format="synthetic", max_length=b.max_length, max_prompt_length=b.max_prompt_length,
                      validation_fraction=0.02, synthetic={"num_pairs": b.num_pairs, "seed": 0})


def our_batches(b: Bench) -> list:
    """The training examples our loop trains on, step after step, in its order (a pure function of
    seed and step): TRL is fed the same sequence, so both sides pad and compute the same batches."""
    from trainers.batching import DataOrder
    from trainers.data import load_examples

    examples, _ = load_examples(data_config(b), "train")
    order = DataOrder(examples, training_config(b), world=1)
    return [e for step in range(1, b.steps + 1) for e in order.step_pairs(step)]


def ours(b: Bench, tmp: str, precision: str, checkpointing: bool) -> tuple[float, dict]:
    from trainers.distributed import use_bf16
    from trainers.loop import CHECKPOINTS, TrainSpec, make_optimizer, train
    from trainers.sessions import LocalSession
    from trainers.storage import Storage

    stamps: dict[int, float] = {}
    threads: set[int] = set()

    def stamp(metrics: dict) -> None:
        stamps[int(metrics["step"])] = time.perf_counter()
        threads.add(torch.get_num_threads())

    training = training_config(b, precision, checkpointing)
    spec = TrainSpec(ModelConfig(tiny=b.model), TokenizerConfig(kind="byte"), data_config(b), training, tmp, step_logger=stamp)
    train(spec, LocalSession(lambda metrics, saved: None, Storage(tmp).child(CHECKPOINTS), keep=1))
    # The loop builds its optimizer with make_optimizer: the same call on a stand-in shows its implementation.
    probe = torch.nn.Linear(2, 2)
    return step_times(stamps, b), {"optimizer": describe_adamw(make_optimizer(probe, training)),
                                    "checkpointing": training.activation_checkpointing,
                                    "precision": "bf16" if use_bf16(precision, torch.device("cpu")) else "fp32",
                                    "threads": sorted(threads)}


def trl(b: Bench, tmp: str, precision: str, checkpointing: bool) -> tuple[float, dict]:
    import datasets
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trainers.models import build_tiny_model, make_byte_tokenizer

    datasets.disable_progress_bars()
    # TRL 1.16 still calls transformers' renamed gradient_checkpointing_* methods: one warning per step otherwise.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    tokenizer = make_byte_tokenizer()
    pairs = our_batches(b)  # taken in this order (sequential sampler): the batches our loop trains on
    data = Dataset.from_dict({"prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs],
                              "rejected": [p.rejected for p in pairs]})
    policy = build_tiny_model(b.model, len(tokenizer), tokenizer.pad_token_id)
    reference = build_tiny_model(b.model, len(tokenizer), tokenizer.pad_token_id)
    stamps: dict[int, float] = {}
    threads: set[int] = set()

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps[state.global_step] = time.perf_counter()
            threads.add(torch.get_num_threads())

    args = DPOConfig(
        output_dir=tmp, use_cpu=True, seed=b.seed, report_to=[], save_strategy="no", eval_strategy="no",
        logging_steps=b.steps + 1, disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=b.batch, gradient_accumulation_steps=1, max_steps=b.steps,
        max_length=b.max_length, truncation_mode="keep_start", train_sampling_strategy="sequential",
        loss_type=["sigmoid"], beta=b.beta, sync_ref_model=True, ref_model_mixup_alpha=b.alpha, ref_model_sync_steps=b.tau,
        # TRL 1.16 defaults that differ from our loop, pinned:
        bf16=precision == "bf16",  # default True, even on CPU
        **checkpointing_args(checkpointing),  # default on
        optim="adamw_torch",  # transformers 5 defaults to "adamw_torch_fused"
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=b.max_grad_norm,
        learning_rate=b.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
    )
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics dict on stdout
    trainer.add_callback(Stamp())  # after TRL's SyncRefModelCallback: a step's time includes its reference sync
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    mixed = str(getattr(trainer.accelerator, "mixed_precision", "?"))
    return step_times(stamps, b), {"optimizer": describe_adamw(optimizer),
                                    "checkpointing": is_checkpointing(policy),
                                    "precision": "bf16" if mixed == "bf16" else "fp32" if mixed == "no" else mixed,
                                    "threads": sorted(threads)}


def checkpointing_args(on: bool) -> dict:
    """TRL's gradient checkpointing, under the name this transformers reads (5.x renamed it to
    activation_checkpointing; the old name is a deprecated alias that TRL's default still sets)."""
    from trl import DPOConfig

    prefix = "activation" if "activation_checkpointing" in DPOConfig.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": on, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def is_checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    raise RuntimeError(f"cannot tell whether {type(model).__name__} checkpoints activations")


def native_bf16() -> bool:
    """Whether bf16 runs natively here (a GPU, or a CPU with AVX-512 BF16 / AMX); else it is emulated."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def run_trl(args) -> None:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        sys.exit('train_throughput.py trl needs TRL: pip install -e ".[bench]"')
    import transformers
    import trl as trl_module

    b = QUICK if args.quick else FULL
    b = replace(b, steps=args.steps or b.steps)
    torch.set_num_threads(args.threads)
    from trainers.models import build_tiny_model, make_byte_tokenizer

    params = sum(p.numel() for p in build_tiny_model(b.model, len(make_byte_tokenizer())).parameters())
    print(f"{'QUICK (checks the script; numbers mean nothing): ' if args.quick else ''}model Llama {b.model.num_layers} "
          f"layers x {b.model.hidden_size} ({params / 1e6:.2f}M parameters), byte tokenizer, {b.num_pairs} synthetic pairs, "
          f"{b.steps} steps per side, steps 2..{b.steps - 1} timed, {args.repeats} repeat(s) per side taken in turns, per step the fastest kept; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl_module.__version__}", flush=True)
    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    if args.precision == "auto":
        precisions = ("fp32", "bf16") if args.quick or native_bf16() else ("fp32",)
        if "bf16" not in precisions:
            print("bf16 skipped: this CPU has no native bf16 (oneDNN reports none; a bf16 matmul is emulated, tens of "
                  "times slower than fp32). --precision bf16 measures it anyway.", flush=True)
    modes = (False, True) if args.checkpointing == "both" else ({"off": False, "on": True}[args.checkpointing],)
    for checkpointing in modes:
        for precision in precisions:
            label = f"{precision}, checkpointing {'on' if checkpointing else 'off'}"
            print(f"\n== {label}; pinned on both sides:", flush=True)
            for key, value in pinned_settings(b, precision, checkpointing, args.threads).items():
                print(f"   {key}: {value}")
            # Both sides train the same batches in the same order, so step k costs the same work on
            # each: per step, the fastest of the repeats filters out moments when something else ran.
            fastest: dict[str, dict[int, float]] = {"ours": {}, "TRL": {}}
            seen = {}
            for repeat in range(args.repeats):
                for side, fn in (("ours", ours), ("TRL", trl)):
                    with tempfile.TemporaryDirectory(prefix="trdpo-bench-") as tmp:
                        times, actual = fn(b, tmp, precision, checkpointing)
                    fastest[side] = {k: min(v, fastest[side].get(k, v)) for k, v in times.items()}
                    seen[side] = actual
                    print(f"   {side:>4}, repeat {repeat + 1}: {pairs_per_s(times, b):7.2f} pairs/s", flush=True)
            best = {side: pairs_per_s(times, b) for side, times in fastest.items()}
            # What each side actually built: a drifted default would show here and stop the run.
            for key in ("optimizer", "checkpointing", "precision", "threads"):
                line = f"   built, {key}: ours {seen['ours'][key]} | TRL {seen['TRL'][key]}"
                print(line)
                if seen["ours"][key] != seen["TRL"][key]:
                    raise SystemExit(f"settings differ between the sides ({key}): {seen['ours'][key]} vs {seen['TRL'][key]}")
            print(f"{label}: ours {best['ours']:.2f} pairs/s, TRL DPOTrainer(sync_ref_model) {best['TRL']:.2f} pairs/s, "
                  f"ratio {best['ours'] / best['TRL']:.3f}x (target >= 1.0; per step the fastest of {args.repeats} "
                  f"repeat(s))", flush=True)


# ----------------------------------------------------------------------------------------- ray


def _median_metric(tracking_uri: str, key: str) -> float:
    import statistics

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("bench")
    run = next(r for r in client.search_runs([experiment.experiment_id]) if client.get_metric_history(r.info.run_id, key))
    return statistics.median(m.value for m in client.get_metric_history(run.info.run_id, key))


def run_ray(args) -> None:
    """Both sides are whole `trdpo train` commands (start-up included); the full run is tuned to >= 60 s."""
    steps = args.steps or (20 if args.quick else 1500)
    log_every = 5 if args.quick else 10
    model = (["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_heads=2"] if args.quick
             else ["model.tiny.hidden_size=128", "model.tiny.intermediate_size=256"])
    common = model + [f"training.max_steps={steps}", "training.eval_every=null", "training.checkpoint_every=null",
                      f"training.log_every={log_every}", f"data.synthetic.num_pairs={200 if args.quick else 4000}",
                      "training.per_device_batch_size=8", f"training.tau={4 if args.quick else 16}",
                      "training.precision=fp32", "training.warmup_steps=0"]
    print(f"{'QUICK (checks the script; numbers mean nothing): ' if args.quick else ''}{steps} steps, "
          f"settings: {' '.join(common)}", flush=True)
    wall, rate = {}, {}
    plain, on_ray = "plain loop (--no-ray)", "Ray Train, 1 worker"

    def measure(name: str, extra: list[str]) -> None:
        with tempfile.TemporaryDirectory(prefix="trdpo-bench-") as tmp:
            uri = f"sqlite:///{tmp}/m.db"
            sets = common + [f"tracking.tracking_uri={uri}", f"tracking.output_dir={tmp}/runs", "tracking.experiment_name=bench"]
            cmd = [sys.executable, "-m", "orchestrator.cli", "train", *extra, *sum([["--set", c] for c in sets], [])]
            start = time.perf_counter()
            pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath})
            wall[name] = time.perf_counter() - start
            if done.returncode != 0:
                sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            rate[name] = _median_metric(uri, "train/pairs_per_s")

    # The worker gets every core the plain loop uses (it sets torch threads to its CPU share).
    sides = {plain: ["--no-ray"], on_ray: ["--set", f"training.resources_per_worker.CPU={os.cpu_count()}"]}
    # Measured one after the other; --quick runs both at once (its times mean nothing anyway).
    with ThreadPoolExecutor(max_workers=2 if args.quick else 1) as pool:
        list(pool.map(measure, sides, sides.values()))
    for name in sides:
        print(f"{name}: {wall[name]:.1f} s wall, median {rate[name]:.1f} pairs/s while training", flush=True)
    print(f"Ray/plain wall-time ratio {wall[on_ray] / wall[plain]:.3f}x (target <= 1.15); "
          f"steady-state step-time ratio {rate[plain] / rate[on_ray]:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["trl", "ray"])
    parser.add_argument("--quick", action="store_true", help="Tiny settings, seconds: checks the script, measures nothing.")
    parser.add_argument("--steps", type=int, default=None, help="Steps per side (trl: >= 4).")
    parser.add_argument("--repeats", type=int, default=None, help="trl: runs per side, in turns; the best is kept (default 2, quick 1).")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both",
                        help="trl: activation checkpointing on both sides, off on both, or each in turn (default).")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "both"], default="auto",
                        help="trl: both sides in this precision; auto (default) = fp32, and bf16 too where it is native "
                        "(always both with --quick).")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="trl: torch threads (both sides).")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.what == "trl" and args.steps is not None and args.steps < 4:
        parser.error("trl: --steps must be >= 4 (steps 2..N-1 are timed)")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    {"trl": run_trl, "ray": run_ray}[args.what](args)


if __name__ == "__main__":
    main()
