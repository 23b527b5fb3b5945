"""Training throughput and memory, each as a ratio against a baseline measured in the same run.

    python benchmarks/train_throughput.py trl       # (a) our loop vs TRL DPOTrainer(sync_ref_model=True), one process
    python benchmarks/train_throughput.py ray       # (b) Ray Train with 1 worker vs the plain loop, >= 60 s each
    python benchmarks/train_throughput.py memory    # (c) per-worker model state and peak RSS, 2 workers vs 1

(a) needs the optional extra: pip install -e ".[bench]". Same model (~11M-parameter Llama, byte
tokenizer), same synthetic pairs, batch size, lengths, soft update (alpha 0.6, tau 4) and threads.
Steps are timed from the end of step 1 to the end of step N-1 (no warm-up, no final validation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainers.config import DataConfig, ModelConfig, TinyModelConfig, TokenizerConfig, TrainingConfig  # noqa: E402
from trainers.loop import LocalSession, TrainSpec, train  # noqa: E402

MODEL = TinyModelConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1024, max_position_embeddings=128)
BATCH, MAX_LEN, MAX_PROMPT = 8, 96, 32


def spec(steps: int, output_dir: str, precision: str = "fp32", model: TinyModelConfig = MODEL, workers: int = 1) -> TrainSpec:
    return TrainSpec(
        ModelConfig(tiny=model), TokenizerConfig(kind="byte"),
        DataConfig(format="synthetic", max_length=MAX_LEN, max_prompt_length=MAX_PROMPT, validation_fraction=0.02,
                   synthetic={"num_pairs": 4000, "seed": 0}),
        TrainingConfig(ref_update="soft", alpha=0.6, tau=4, learning_rate=1e-4, per_device_batch_size=BATCH,
                       max_steps=steps, lr_scheduler="constant", num_workers=workers, log_every=1, precision=precision),
        output_dir,
    )


def ours_pairs_per_s(steps: int, tmp: str, precision: str) -> float:
    stamps = {}
    train(spec(steps, tmp, precision), LocalSession(lambda m, _: stamps.setdefault(m["step"], time.perf_counter()), Path(tmp) / "ckpt"))
    return (steps - 2) * BATCH / (stamps[steps - 1] - stamps[1])


def trl_pairs_per_s(steps: int, tmp: str, precision: str) -> float:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trainers.models import build_tiny_model, make_byte_tokenizer
    from trainers.synthetic import make_pairs

    tokenizer = make_byte_tokenizer()
    pairs = make_pairs(4000, 0)
    data = Dataset.from_dict({"prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs],
                              "rejected": [p.rejected for p in pairs]})
    policy = build_tiny_model(MODEL, len(tokenizer), tokenizer.pad_token_id)
    reference = build_tiny_model(MODEL, len(tokenizer), tokenizer.pad_token_id)
    stamps: dict[int, float] = {}

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps[state.global_step] = time.perf_counter()

    args = DPOConfig(
        output_dir=tmp, per_device_train_batch_size=BATCH, max_length=MAX_LEN, max_steps=steps, learning_rate=1e-4,
        lr_scheduler_type="constant", beta=0.1, sync_ref_model=True, ref_model_mixup_alpha=0.6, ref_model_sync_steps=4,
        logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=42,
        bf16=precision == "bf16",  # TRL defaults to bf16 autocast, even on CPU: compare like with like
    )
    if hasattr(args, "max_prompt_length"):
        args.max_prompt_length = MAX_PROMPT
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[Stamp()])
    trainer.train()
    return (steps - 2) * BATCH / (stamps[steps - 1] - stamps[1])


def run_trl(args) -> None:
    import tempfile

    print(f"model: {MODEL.num_layers} layers x {MODEL.hidden_size}, batch {BATCH}, max_length {MAX_LEN}, "
          f"{torch.get_num_threads()} threads, {args.steps} steps each")
    for precision in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            ours = ours_pairs_per_s(args.steps, a, precision)
            theirs = trl_pairs_per_s(args.steps, b, precision)
        print(f"{precision}: ours {ours:.1f} pairs/s, TRL DPOTrainer(sync_ref_model) {theirs:.1f} pairs/s, "
              f"ratio {ours / theirs:.2f}x (target >= 1.0)", flush=True)


def _median_metric(tracking_uri: str, key: str) -> float:
    import statistics

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("trdpo-demo").experiment_id])[0]
    return statistics.median(m.value for m in client.get_metric_history(run.info.run_id, key))


def run_ray(args) -> None:
    """Both sides are whole `trdpo train` commands (startup included), tuned to >= 60 s."""
    import tempfile

    common = [f"training.max_steps={args.steps}", "training.eval_every=null", "training.checkpoint_every=null",
              "training.log_every=10", "model.tiny.hidden_size=128", "model.tiny.intermediate_size=256",
              "data.synthetic.num_pairs=4000", "training.per_device_batch_size=8", "training.tau=16"]
    wall, rate = {}, {}
    # The worker gets every core the plain loop uses (it sets torch threads to its CPU share).
    for name, extra in (("plain loop (--no-ray)", ["--no-ray"]),
                        ("Ray Train, 1 worker", ["--set", f"training.resources_per_worker.CPU={os.cpu_count()}"])):
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"sqlite:///{tmp}/m.db"
            cmd = [sys.executable, "-m", "orchestrator.cli", "train", *extra,
                   *sum([["--set", c] for c in common + [f"tracking.tracking_uri={uri}", f"tracking.output_dir={tmp}"]], [])]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
            wall[name] = time.perf_counter() - start
            rate[name] = _median_metric(uri, "train/pairs_per_s")
            print(f"{name}: {wall[name]:.1f} s wall, median {rate[name]:.1f} pairs/s while training", flush=True)
    plain, on_ray = "plain loop (--no-ray)", "Ray Train, 1 worker"
    print(f"Ray/plain wall-time ratio {wall[on_ray] / wall[plain]:.3f} (target <= 1.15); "
          f"steady-state step-time ratio {rate[plain] / rate[on_ray]:.3f}")


def run_memory(args) -> None:
    import tempfile

    model = "model.tiny.hidden_size=512 model.tiny.num_layers=8 model.tiny.num_heads=8 model.tiny.intermediate_size=1536"
    out = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            sets = model.split() + ["training.max_steps=3", f"training.num_workers={workers}", "training.eval_every=null",
                                    "training.checkpoint_every=null", "data.synthetic.num_pairs=400", "training.tau=2",
                                    f"tracking.tracking_uri=sqlite:///{tmp}/m.db", f"tracking.output_dir={tmp}"]
            cmd = [sys.executable, "-m", "orchestrator.cli", "train", *sum([["--set", s] for s in sets], [])]
            subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
            import mlflow

            client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp}/m.db")
            run = client.search_runs([client.get_experiment_by_name("trdpo-demo").experiment_id])[0]
            out[workers] = {k: run.data.metrics[f"system/{k}_rank0"] for k in ("model_state_mb", "peak_memory_mb")}
            print(f"{workers} worker(s): {json.dumps(out[workers])}", flush=True)
    for key in ("model_state_mb", "peak_memory_mb"):
        print(f"{key}: 2 workers / 1 worker = {out[2][key] / out[1][key]:.3f}" + (" (target <= 0.65)" if key == "model_state_mb" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["trl", "ray", "memory"])
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    args.steps = args.steps or {"trl": 40, "ray": 1500, "memory": 3}[args.what]
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    {"trl": run_trl, "ray": run_ray, "memory": run_memory}[args.what](args)


if __name__ == "__main__":
    main()
