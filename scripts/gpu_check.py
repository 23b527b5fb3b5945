"""One short check of the GPU path on a lent CUDA machine; it stops at the first failure.

    bash scripts/gpu_check.sh                 # every GPU of the machine (one is enough), results under $OUT
    python scripts/gpu_check.py --allow-cpu --quick     # the same steps on CPU/gloo, tiny (the test suite runs this)

Each step prints ``PASS <what>`` or ends the run with ``FAIL <what>: <why>`` and exit status 1:

1. **sharding** (``trainers.fsdp_check`` under torchrun, NCCL, bf16 mixed precision): GPT-NeoX and
   Llama loaded once into FSDP2 shards, sharded even on one GPU (a 1-rank mesh still goes
   through DTensor); the shard-local soft and hard updates equal the unsharded rule exactly;
   activation checkpointing leaves the gradients unchanged; packed + chunked training equals the
   padded whole-logits path (fp32, 16 steps, soft and hard).
2. **training** (``trainers.loop`` under torchrun, via ``trainers.entrypoints``): a GPT-NeoX model in bf16, sharded, soft then
   hard updates: the loss is finite and falls (the second half's mean below step 1's log 2, the
   final val/loss below log 2), the reference moves exactly at multiples of tau,
   the sharded checkpoint written at the end reads back unsharded and equals the exported
   Hugging Face policy exactly; tokens/s printed.
3. **memory**: ``trdpo plan`` against the measured peak (``torch.cuda.max_memory_allocated``;
   RSS on CPU) for the shapes of ``benchmarks/memory.py plan`` (printed, not asserted: the plan is
   an estimate).
4. **LoRA**: a Pythia-410M-shaped GPT-NeoX (the architecture only, random weights; the tiny
   model on CPU) with LoRA adapters (rank 16 on every linear layer of the blocks) on a bf16 base,
   soft TR-DPO, sharded: the same training checks as step 2, and the peak memory against
   ``trdpo plan`` for the same file (printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class CheckFailed(Exception):
    """A check whose result is wrong: the run stops here."""


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port, never one handed out before (--quick starts several torchruns at once)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def run(cmd: list[str], log: Path, timeout: int) -> str:
    """Run ``cmd`` with the repository importable; its output goes to ``log``; a non-zero exit fails the check."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"{' '.join(cmd[:6])}... ran past {timeout} s") from exc
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd[:6])}... exited {done.returncode}; last lines:\n{done.stderr[-2500:]}")
    return done.stdout


def torchrun(ngpu: int, module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ngpu), "--master-port", str(free_port()),
            "-m", module, *args]


# ------------------------------------------------------------------------- what each step checks


def check_sharding(output: str, families: list[str], world: int, checkpointing_tolerance: float,
                   packing_tolerance: float) -> list[str]:
    """The lines ``trainers.fsdp_check --train --packing`` printed, judged; returns the PASS lines."""
    passed = []
    for family in families:
        match = re.search(rf"^fsdp_check family={family} world={world} device=\w+ (.*)$", output, re.MULTILINE)
        if not match:
            raise CheckFailed(f"sharding: no fsdp_check line for {family} on {world} rank(s)")
        diffs = {k: float(v) for k, v in re.findall(r"(\w+)_max_abs_diff=(\S+)", match.group(1))}
        if set(diffs) != {"load", "soft", "hard", "checkpointing_grad"}:
            raise CheckFailed(f"sharding {family}: expected load/soft/hard/checkpointing_grad, got {sorted(diffs)}")
        for key in ("load", "soft", "hard"):
            if diffs[key] != 0.0:
                raise CheckFailed(f"sharding {family}: {key} differs from the unsharded rule by {diffs[key]:.3e} (must be 0)")
        if not diffs["checkpointing_grad"] <= checkpointing_tolerance:
            raise CheckFailed(f"sharding {family}: activation checkpointing changes gradients by "
                              f"{diffs['checkpointing_grad']:.3e} (> {checkpointing_tolerance:g})")
        passed.append(f"sharding {family}: load, soft and hard updates exact, checkpointing gradients within "
                      f"{diffs['checkpointing_grad']:.1e}")
        record = next((json.loads(line.removeprefix("fsdp_packing ")) for line in output.splitlines()
                       if line.startswith("fsdp_packing ") and f'"family": "{family}"' in line), None)
        if record is None:
            raise CheckFailed(f"packing {family}: no fsdp_packing line")
        worst = 0.0
        for update, curves in record["curves"].items():
            fast, reference = curves["fast"], curves["reference"]
            if sorted(fast) != sorted(reference) or len(reference) < 2:
                raise CheckFailed(f"packing {family} {update}: steps differ ({sorted(fast)} vs {sorted(reference)})")
            for step, metrics in reference.items():
                for key, value in metrics.items():
                    scale = max(1.0, abs(value)) if key.startswith("val/") else 1.0
                    worst = max(worst, abs(fast[step][key] - value) / scale)
        if not worst <= packing_tolerance:
            raise CheckFailed(f"packing {family}: packed + chunked differs from padded by {worst:.3e} (> {packing_tolerance:g})")
        passed.append(f"packing {family}: packed + chunked = padded whole logits within {worst:.1e} (soft and hard)")
    return passed


def check_training(jsonl: str, tau: int, steps: int) -> tuple[dict, str]:
    """The JSON lines of ``trainers.loop`` (rank 0) judged; returns (last metrics, a PASS line)."""
    rows = [record["metrics"] for record in map(json.loads, (line for line in jsonl.splitlines() if line.startswith("{")))
            if "metrics" in record]
    if not rows:
        raise CheckFailed("training: no metrics printed")
    by_step = {int(r["step"]): r for r in rows}
    if max(by_step) != steps:
        raise CheckFailed(f"training: ended at step {max(by_step)}, not {steps}")
    losses = [by_step[s]["train/loss"] for s in sorted(by_step)]
    if not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"training: non-finite loss {losses}")
    # Falls: step 1 scores the policy against an identical reference (loss log 2); later steps,
    # hard updates' restarts at log 2 included, average below it. Validation is always against the
    # initial reference, so its loss at the end is below its step-0 value, log 2.
    later = losses[len(losses) // 2:]
    if not sum(later) / len(later) < losses[0]:
        raise CheckFailed(f"training: the loss does not fall: step 1 {losses[0]:.4f}, mean of the second half "
                          f"{sum(later) / len(later):.4f}")
    if "val/loss" in by_step[steps] and not by_step[steps]["val/loss"] < math.log(2):
        raise CheckFailed(f"training: val/loss {by_step[steps]['val/loss']:.4f} at the end is not below its "
                          f"step-0 value log 2 = {math.log(2):.4f}")
    updated = [s for s, r in sorted(by_step.items()) if r.get("train/ref_updated") == 1.0]
    if updated != list(range(tau, steps + 1, tau)):
        raise CheckFailed(f"training: reference updated at {updated}, expected every {tau} steps")
    last = by_step[steps]
    if "val/loss" not in last:
        raise CheckFailed("training: no validation at the last step")
    rates = sorted(r["train/tokens_per_s"] for r in rows[len(rows) // 4:])
    line = (f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, reference updated at {updated[:4]}{'...' if len(updated) > 4 else ''}, "
            f"val/loss {last['val/loss']:.4f}, max grad norm {max(r['train/grad_norm'] for r in rows):.2f}, "
            f"median {rates[len(rates) // 2]:.0f} tokens/s")
    return last, line


def check_export_equals_checkpoint(run_dir: Path) -> str:
    """The final sharded checkpoint read back unsharded equals the exported policy, tensor by tensor."""
    from safetensors.torch import load_file

    from trainers.state.checkpoint import read_checkpoint
    from trainers.loop import CHECKPOINTS, POLICY
    from trainers.state.storage import Storage

    state = read_checkpoint(Storage(str(run_dir)).child(CHECKPOINTS))
    exported: dict = {}
    for file in sorted((run_dir / POLICY).glob("*.safetensors")):
        exported.update(load_file(file))
    missing = set(state["policy"]) - set(exported)
    if missing - {k for k in missing if "lm_head" in k or "embed_out" in k}:  # a tied head is saved once
        raise CheckFailed(f"export: tensors missing from the exported policy: {sorted(missing)[:5]}")
    worst = max((state["policy"][k].float() - exported[k].float()).abs().max().item() for k in exported if k in state["policy"])
    if worst != 0.0:
        raise CheckFailed(f"export: exported policy differs from the final checkpoint by {worst:.3e}")
    return f"sharded checkpoint (step {state['step']}, world {state['world_size']}) reads back equal to the exported policy"


def lora_model(out: Path, cuda: bool) -> Path:
    """Pythia-410M's architecture with random weights on a GPU (nothing is downloaded); on CPU the
    tiny GPT-NeoX step 1 wrote."""
    if not cuda:
        return out / "fsdp" / "models" / "gpt_neox"
    path = out / "pythia-410m-random"
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM

        from trainers.model.build import make_byte_tokenizer
        from trainers.model.memory import known_architecture

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(known_architecture("EleutherAI/pythia-410m")).save_pretrained(path)
        make_byte_tokenizer().save_pretrained(path)
    return path


def planned_total_mib(plan_output: str) -> float:
    """The per-worker total that ``trdpo plan`` printed, in MiB."""
    match = re.search(r"^\s*total \(estimate\)\s+([\d.]+) (KiB|MiB|GiB)", plan_output, re.MULTILINE)
    if not match:
        raise CheckFailed(f"LoRA: no total in the plan:\n{plan_output[-1500:]}")
    return float(match.group(1)) * {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}[match.group(2)]


# ------------------------------------------------------------------------------------------ run


SMOKE = """
model: {{name_or_path: {model}}}
tokenizer: {{name_or_path: {model}}}
data: {{format: synthetic, synthetic: {{num_pairs: {pairs}}}, max_length: 96, max_prompt_length: 32, validation_fraction: 0.05}}
training: {{ref_update: {mode}, {alpha}tau: {tau}, learning_rate: 1.0e-3, warmup_steps: 2, per_device_batch_size: {batch},
           max_steps: {steps}, eval_every: {eval_every}, checkpoint_every: {half}, log_every: 1, precision: {precision},
           shard_one_worker: true}}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_check")), help="Logs go here.")
    parser.add_argument("--ngpu", type=int, default=None, help="Ranks (default: every GPU; 1 on CPU).")
    parser.add_argument("--allow-cpu", action="store_true", help="Run the same steps on CPU/gloo (checks the script).")
    parser.add_argument("--quick", action="store_true", help="Fewer families and steps, steps 2-4's processes started "
                        "side by side (the CPU check in the test suite).")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        sys.exit("FAIL environment: no CUDA device (use --allow-cpu to run the steps on CPU)")
    for leftover in ("fsdp", "run_soft", "run_hard", "run_lora"):  # a rerun starts afresh (a run would resume its checkpoint)
        shutil.rmtree(args.out / leftover, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    ngpu = args.ngpu or (torch.cuda.device_count() if cuda else 1)
    import transformers

    device = f"{torch.cuda.get_device_name()} x {ngpu}" if cuda else f"CPU, {ngpu} rank(s)"
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, {device}, "
          f"bf16 {'supported' if cuda and torch.cuda.is_bf16_supported() else 'n/a'}", flush=True)
    families = ["gpt_neox"] if args.quick else ["gpt_neox", "llama"]
    precision = "bf16" if cuda else "fp32"
    memory_command = [sys.executable, str(REPO / "benchmarks" / "memory.py"), "plan", *(["--quick"] if args.quick else [])]
    started: dict = {}
    if args.quick:  # step 3 needs nothing from steps 1-2: it runs beside them
        pool = ThreadPoolExecutor(max_workers=5)
        started["memory"] = pool.submit(run, memory_command, args.out / "memory_plan.log", 1200)
    try:
        print("== 1. sharding", flush=True)
        output = run(torchrun(ngpu, "trainers.fsdp_check", "--work-dir", str(args.out / "fsdp"), "--families", *families,
                              "--train", "--packing"), args.out / "fsdp_check.log", timeout=900)
        for line in check_sharding(output, families, ngpu, checkpointing_tolerance=1e-2 if cuda else 1e-6,
                                   packing_tolerance=1e-4 if cuda else 1e-5):
            print(f"PASS {line}", flush=True)

        steps, tau = (8, 2) if args.quick else (40, 4)
        settings = dict(pairs=400 if args.quick else 4000, tau=tau, steps=steps, half=steps // 2, eval_every=steps // 2,
                        batch=4 if args.quick else 32, precision=precision)

        def training_config(mode: str) -> Path:
            config = args.out / f"train_{mode}.yaml"
            config.write_text(SMOKE.format(model=args.out / "fsdp" / "models" / "gpt_neox",  # written by step 1
                                           mode=mode, alpha="alpha: 0.6, " if mode == "soft" else "", **settings))
            return config

        def lora_config() -> Path:
            import yaml

            tree = yaml.safe_load(SMOKE.format(model=lora_model(args.out, cuda), mode="soft", alpha="alpha: 0.6, ", **settings))
            tree["model"]["lora"] = {"rank": 16, "alpha": 32, "base_dtype": "bf16" if cuda else "fp32"}
            tree["training"]["learning_rate"] = 5.0e-3  # adapters start at zero: LoRA's usual, larger step
            config = args.out / "train_lora.yaml"
            config.write_text(yaml.safe_dump(tree))
            return config

        def train_command(config: Path, name: str) -> list[str]:
            return torchrun(ngpu, "trainers.entrypoints", str(config), "--output-dir", str(args.out / f"run_{name}"))

        if args.quick:
            # Every other process of steps 2-4 starts now, side by side (on CPU each uses one core,
            # and a tiny run is mostly imports); their results are judged and printed in step order below.
            for mode in ("soft", "hard"):
                started[mode] = pool.submit(run, train_command(training_config(mode), mode), args.out / f"train_{mode}.log", 900)
            config = lora_config()
            started["lora"] = pool.submit(run, train_command(config, "lora"), args.out / "train_lora.log", 900)
            started["plan_lora"] = pool.submit(run, [sys.executable, "-m", "orchestrator.cli", "plan", str(config)],
                                               args.out / "plan_lora.log", 300)
            pool.shutdown(wait=False)

        def output_of(name: str, make_command, log: str, timeout: int) -> str:
            """The output of the process started above for ``name``, or (not --quick) of it run now."""
            if name in started:
                return started.pop(name).result()
            return run(make_command(), args.out / log, timeout=timeout)

        print(f"== 2. training ({precision}, sharded on {ngpu} rank(s))", flush=True)
        for mode in ("soft", "hard"):
            output = output_of(mode, lambda: train_command(training_config(mode), mode), f"train_{mode}.log", 900)
            _, line = check_training(output, tau, steps)
            print(f"PASS training {mode}: {line}", flush=True)
            print(f"PASS {mode}: {check_export_equals_checkpoint(args.out / f'run_{mode}')}", flush=True)

        print("== 3. memory: plan vs measured", flush=True)
        output = output_of("memory", lambda: memory_command, "memory_plan.log", 1200)
        for line in output.splitlines():
            if "plan/measured" in line:
                print(f"     {line}", flush=True)

        print(f"== 4. LoRA (rank 16, {'bf16' if cuda else 'fp32'} base, soft, sharded on {ngpu} rank(s))", flush=True)
        config = args.out / "train_lora.yaml" if args.quick else lora_config()
        output = output_of("lora", lambda: train_command(config, "lora"), "train_lora.log", 900)
        last, line = check_training(output, tau, steps)
        print(f"PASS LoRA training: {line}", flush=True)
        plan = output_of("plan_lora", lambda: [sys.executable, "-m", "orchestrator.cli", "plan", str(config)], "plan_lora.log", 300)
        measured = last["system/peak_memory_mb_rank0"]
        print(f"     LoRA peak memory rank 0: measured {measured:.0f} MiB ({'max allocated' if cuda else 'RSS'}), "
              f"plan {planned_total_mib(plan):.0f} MiB (plan/measured {planned_total_mib(plan) / measured:.2f})", flush=True)
    except CheckFailed as failure:
        print(f"FAIL {failure}", flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)


if __name__ == "__main__":
    main()
