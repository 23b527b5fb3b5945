"""The per-worker TR-DPO / SFT training loop: one flat function, top to bottom.

    policy, reference  <- same initial weights (or a named reference), sharded alike with FSDP2
    for step in 1..total_steps:
        for each micro-batch: one forward of [chosen; rejected] through policy (and reference,
                              no_grad), DPO/IPO loss, backward
        clip (the pre-clip norm is the paper's stability signal), AdamW step, LR schedule
        if step % tau == 0: reference <- alpha*policy + (1-alpha)*reference   (shard-local)
        report metrics; every eval_every: validation against the *initial* reference;
        every checkpoint_every: save the whole training state

It runs in one process (``LocalSession``) or as a Ray Train worker function (``ray_train_worker``);
with more than one worker the models are FSDP2-sharded over a device mesh.

    trdpo train experiments/demo.yaml --set training.ref_update=soft --set training.alpha=0.6
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from trainers.checkpoint import full_model_state, load_training_state, save_training_state
from trainers.config import DataConfig, ModelConfig, TokenizerConfig, TrainingConfig
from trainers.data import LoadReport, PreferenceBatch, TokenizedPair, collate_pairs, load_examples, tokenize_examples
from trainers.models import build_policy, build_reference, build_tokenizer
from trainers.sessions import LocalSession, RayTrainSession, Session
from trainers.trdpo import PreferenceLogps, ReferenceUpdater, preference_loss, sequence_logprobs, token_kl


@dataclass
class TrainSpec:
    """What a worker needs: the trainers' config sections and where to write."""

    model: ModelConfig
    tokenizer: TokenizerConfig
    data: DataConfig
    training: TrainingConfig
    output_dir: str
    fault_injection: str | None = None  # "STEP:RANK": that worker kills itself once (tests only)
    # Called on rank 0 with every logged step's metrics (the orchestrator passes an MLflow logger:
    # logging straight from rank 0 keeps ray.train.report, a synchronisation point, for the steps
    # that need it: validation and checkpoints).
    step_logger: Callable[[dict], None] | None = None


# ------------------------------------------------------------------------------------ helpers


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def shard_alike(models: list[torch.nn.Module], device: torch.device, bf16: bool) -> None:
    """FSDP2 over every rank: each decoder layer, then the root. Policy and reference get the
    same wrapping, so their local shards line up one to one for the shard-local update."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for model in models:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        # reshard_after_forward on the root too: a no_grad forward must not leave parameters
        # gathered, or a shard-local update would write into a discarded full copy.
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


def local_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters this rank owns (DTensor local shards under FSDP2, full tensors otherwise)."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The pair order of one epoch (computed once per epoch, not once per micro-batch)."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist())


def batch_for_step(pairs: list[TokenizedPair], step: int, micro: int, spec: TrainingConfig, rank: int, world: int) -> list[TokenizedPair]:
    """The pairs of micro-batch ``micro`` of optimizer ``step`` (1-based) on ``rank``.

    The data order is a pure function of (seed, step): epoch e is a permutation seeded by
    seed + e; global batch g holds B * world * accumulation pairs. So resuming needs only the
    step, and any world size with the same global batch sees the same pairs per step."""
    per_micro = spec.per_device_batch_size
    global_batch = per_micro * world * spec.gradient_accumulation_steps
    steps_per_epoch = len(pairs) // global_batch
    epoch, position = divmod(step - 1, steps_per_epoch)
    order = epoch_order(len(pairs), spec.seed, epoch)
    start = position * global_batch + (micro * world + rank) * per_micro
    return [pairs[i] for i in order[start : start + per_micro]]


def total_steps(n_pairs: int, spec: TrainingConfig, world: int) -> int:
    global_batch = spec.per_device_batch_size * world * spec.gradient_accumulation_steps
    steps_per_epoch = n_pairs // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{n_pairs} training pairs are fewer than one global batch of {global_batch}")
    return spec.max_steps or max(1, math.ceil(spec.num_epochs * steps_per_epoch))


def make_scheduler(optimizer, spec: TrainingConfig, steps: int):
    def factor(step: int) -> float:  # LambdaLR passes the number of steps taken so far
        if step < spec.warmup_steps:
            return (step + 1) / (spec.warmup_steps + 1)
        progress = (step - spec.warmup_steps) / max(1, steps - spec.warmup_steps)
        if spec.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if spec.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sequence_scores(model, batch: PreferenceBatch, average: bool, bf16: bool) -> torch.Tensor:
    return sequence_logprobs(forward_logits(model, batch, bf16), batch.labels, average=average)[0]


def model_state_bytes(models: list, optimizer) -> int:
    """Bytes this rank holds for parameters, gradients and optimizer state (its shards under FSDP)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = [p for model in models for p in model.parameters()]
    tensors += [p.grad for p in tensors if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def forward_logits(model, batch: PreferenceBatch, bf16: bool) -> torch.Tensor:
    with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


def preference_metrics(pairs, policy, initial_model, reference_logps, spec: TrainingConfig, pad_id: int, device,
                       bf16: bool, prefix: str) -> dict:
    """DPO loss, reward accuracy and margin of ``policy`` against the given (initial) reference
    log-probs, the policy's mean chosen log-prob, and the per-token KL(policy || initial model) of
    next-token distributions along the validation prompts + chosen responses. Reduced over ranks."""
    sums = [0.0] * 7  # loss, accuracy, margin, chosen logp, pairs, kl sum, kl tokens
    with torch.no_grad():
        for start in range(0, len(pairs), spec.per_device_batch_size):
            chunk = pairs[start : start + spec.per_device_batch_size]
            n = len(chunk)
            batch = collate_pairs(chunk, pad_id).to(device)
            logits = forward_logits(policy, batch, bf16)
            scores = sequence_logprobs(logits, batch.labels, average=spec.average_log_prob)[0]
            ref = reference_logps[start : start + n].to(device)
            out = preference_loss(spec.loss, PreferenceLogps(scores[:n], scores[n:], ref[:, 0], ref[:, 1]), spec.beta, spec.label_smoothing)
            kl, kl_tokens = token_kl(logits[:n], forward_logits(initial_model, batch, bf16)[:n], batch.labels[:n])
            sums = [a + b for a, b in zip(sums, [out.losses.sum().item(), out.accuracy.sum().item(), out.margins.sum().item(),
                                                 scores[:n].sum().item(), n, kl.sum().item(), kl_tokens.sum().item()])]
    loss, accuracy, margin, logp, count, kl, kl_tokens = all_reduce_sum(sums, device)
    count = max(count, 1.0)
    return {f"{prefix}/loss": loss / count, f"{prefix}/rewards/accuracy": accuracy / count,
            f"{prefix}/rewards/margins": margin / count, f"{prefix}/logps/chosen": logp / count,
            f"{prefix}/kl_to_initial": kl / max(kl_tokens, 1.0)}


def reference_logps_of(model, pairs, spec: TrainingConfig, pad_id: int, device, bf16: bool) -> torch.Tensor:
    """``[n, 2]`` (chosen, rejected) log-probs of ``pairs`` under ``model``, computed once."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(pairs), spec.per_device_batch_size):
            chunk = pairs[start : start + spec.per_device_batch_size]
            scores = sequence_scores(model, collate_pairs(chunk, pad_id).to(device), spec.average_log_prob, bf16)
            rows.append(torch.stack([scores[: len(chunk)], scores[len(chunk) :]], dim=1).float().cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 2)


# ------------------------------------------------------------------------------------ the loop


def train(spec: TrainSpec, session: Session) -> dict:
    """Run the training described by ``spec``; returns the final metrics. Collective under FSDP."""
    cfg, rank, world = spec.training, session.rank, session.world_size
    device = device_for_rank()
    bf16 = use_bf16(cfg.precision, device)
    # FSDP only when there is something to shard over: on one worker its hooks cost ~17% of a
    # small model's step time (measured) for no memory gain.
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    preference = cfg.stage == "trdpo"

    tokenizer = build_tokenizer(spec.model, spec.tokenizer)
    pad_id = tokenizer.pad_token_id
    train_examples, train_report = load_examples(spec.data, "train")
    val_examples, val_report = load_examples(spec.data, "validation")
    train_pairs = tokenize_examples(train_examples, tokenizer, spec.data, train_report.source, train_report)
    val_pairs = tokenize_examples(val_examples, tokenizer, spec.data, val_report.source, LoadReport(val_report.source))
    my_val = val_pairs[rank::world]  # validation is split over ranks and reduced
    steps = total_steps(len(train_pairs), cfg, world)

    policy = build_policy(spec.model, tokenizer).to(device)
    reference = build_reference(spec.model, tokenizer).to(device) if preference else None
    # The KL-to-initial diagnostic needs the initial model; while the reference moves, a frozen
    # copy is kept (sharded like the others, so it costs 1/world of a model per worker).
    initial = build_reference(spec.model, tokenizer).to(device) if preference and cfg.ref_update != "none" else reference
    for frozen in {id(m): m for m in (reference, initial) if m is not None}.values():
        frozen.requires_grad_(False).eval()
    if distributed:
        shard_alike(list({id(m): m for m in (policy, reference, initial) if m is not None}.values()), device, bf16)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, steps)
    updater = ReferenceUpdater(**cfg.ref_update_kwargs) if preference else None
    if reference is not None:
        policy_names = [n for n, _ in policy.named_parameters()]
        assert policy_names == [n for n, _ in reference.named_parameters()], "policy and reference parameters differ"
        policy_local, reference_local = local_tensors(policy), local_tensors(reference)

    start_step, initial_val_logps = 0, None
    resume_dir = session.resume_dir()
    if resume_dir is not None:
        state = load_training_state(resume_dir, policy=policy, reference=reference, optimizer=optimizer, scheduler=scheduler)
        start_step, initial_val_logps = state["step"], state.get("initial_val_logps")
        if updater is not None:
            updater.load_state_dict(state["updater"])
    if preference and initial_val_logps is None:
        # Validation is measured against the *initial* reference, so it stays comparable across
        # alpha and tau; its log-probs are computed once and kept in every checkpoint.
        initial_val_logps = reference_logps_of(reference, val_pairs, cfg, pad_id, device, bf16)
    my_initial_val = initial_val_logps[rank::world] if preference else None

    if rank == 0:
        print(f"[trdpo] {train_report.summary()}", flush=True)
        print(f"[trdpo] {cfg.stage}: {len(train_pairs)} train / {len(val_pairs)} val pairs, {steps} steps, "
              f"{world} worker(s), ref_update={cfg.ref_update}, resume from step {start_step}", flush=True)

    def validation() -> dict:
        policy.eval()
        if preference:
            out = preference_metrics(my_val, policy, initial, my_initial_val, cfg, pad_id, device, bf16, "val")
        else:
            out = sft_validation(my_val, policy, cfg, pad_id, device, bf16)
        policy.train()
        return out

    def checkpoint(step: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            save_training_state(Path(tmp), policy=policy, reference=reference, optimizer=optimizer, scheduler=scheduler,
                                step=step, updater_state=updater.state_dict() if updater else {},
                                extra={"initial_val_logps": initial_val_logps})
            session.report(metrics, checkpoint_dir=Path(tmp) if rank == 0 else None)

    started, window_pairs, window_tokens, metrics = time.perf_counter(), 0, 0, {}
    for step in range(start_step + 1, steps + 1):
        sums = [0.0] * 6  # loss, chosen reward, rejected reward, accuracy, chosen logp, pairs
        tokens = 0
        for micro in range(cfg.gradient_accumulation_steps):
            batch = collate_pairs(batch_for_step(train_pairs, step, micro, cfg, rank, world), pad_id, chosen_only=not preference).to(device)
            scores = sequence_scores(policy, batch, cfg.average_log_prob or not preference, bf16)
            n = batch.num_pairs
            if preference:
                with torch.no_grad():
                    ref_scores = sequence_scores(reference, batch, cfg.average_log_prob, bf16)
                out = preference_loss(cfg.loss, PreferenceLogps(scores[:n], scores[n:], ref_scores[:n], ref_scores[n:]), cfg.beta, cfg.label_smoothing)
                loss = out.loss
                stats = [out.losses.sum().item(), out.chosen_rewards.sum().item(), out.rejected_rewards.sum().item(),
                         out.accuracy.sum().item(), scores[:n].sum().item(), n]
            else:
                loss = -scores.mean()  # per-token mean NLL of the chosen responses
                stats = [loss.item() * n, 0.0, 0.0, 0.0, scores.sum().item(), n]
            (loss / cfg.gradient_accumulation_steps).backward()
            sums = [a + b for a, b in zip(sums, stats)]
            tokens += batch.num_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        if step == start_step + 1:  # parameters, gradients and optimizer state all exist now
            state_mb = model_state_bytes([policy] + ([reference] if reference is not None else []), optimizer) / 2**20
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        updated = updater.maybe_update(step, reference_local, policy_local) if updater else False
        maybe_inject_fault(spec, step, rank)

        loss_sum, chosen, rejected, accuracy, logp, count, tokens = all_reduce_sum(sums + [float(tokens)], device)
        window_pairs, window_tokens = window_pairs + count, window_tokens + tokens
        is_last = step == steps
        evaluate = bool(cfg.eval_every and step % cfg.eval_every == 0) or is_last
        save = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or is_last
        if step % cfg.log_every == 0 or updated or evaluate or save:
            elapsed = time.perf_counter() - started
            metrics = {
                "step": step, "train/loss": loss_sum / count, "train/logps/chosen": logp / count,
                "train/grad_norm": float(grad_norm), "train/learning_rate": scheduler.get_last_lr()[0],
                "train/pairs_per_s": window_pairs / elapsed, "train/tokens_per_s": window_tokens / elapsed,
                "train/progress": step / steps,
                "system/model_state_mb_rank0": state_mb,
                "system/peak_memory_mb_rank0": peak_memory_bytes(device) / 2**20,
            }
            if preference:
                metrics.update({
                    "train/rewards/chosen": chosen / count, "train/rewards/rejected": rejected / count,
                    "train/rewards/margins": (chosen - rejected) / count, "train/rewards/accuracy": accuracy / count,
                    "train/ref_updates": updater.n_updates, "train/ref_updated": float(updated),
                })
            if evaluate:
                metrics.update(validation())
            if rank == 0 and spec.step_logger is not None:
                spec.step_logger(metrics)
            if save:
                checkpoint(step, metrics)
            elif evaluate:
                session.report(metrics)
            started, window_pairs, window_tokens = time.perf_counter(), 0, 0
    return metrics


def sft_validation(pairs, policy, cfg: TrainingConfig, pad_id: int, device, bf16: bool) -> dict:
    total, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(pairs), cfg.per_device_batch_size):
            chunk = pairs[start : start + cfg.per_device_batch_size]
            scores = sequence_scores(policy, collate_pairs(chunk, pad_id, chosen_only=True).to(device), True, bf16)
            total, count = total - scores.sum().item(), count + len(chunk)
    total, count = all_reduce_sum([total, count], device)
    return {"val/loss": total / max(count, 1.0)}


def export_policy(checkpoint_dir: Path, spec: TrainSpec, out_dir: Path) -> Path:
    """Write the checkpoint's policy as a Hugging Face model directory (with its tokenizer)."""
    state = torch.load(Path(checkpoint_dir) / "state.pt", map_location="cpu", weights_only=False)
    tokenizer = build_tokenizer(spec.model, spec.tokenizer)
    model = build_policy(spec.model, tokenizer)
    model.load_state_dict(state["policy"])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def maybe_inject_fault(spec: "TrainSpec", step: int, rank: int) -> None:
    """Chaos hook for the fault-tolerance tests: ``fault_injection="STEP:RANK"`` (set from the
    driver's ``TRDPO_FAULT_KILL``) makes that worker SIGKILL itself once, right after that step;
    a marker file keeps it to the first attempt."""
    target = spec.fault_injection
    if not target or tuple(map(int, target.split(":"))) != (step, rank):
        return
    marker = Path(spec.output_dir) / f"fault-injected-{step}-{rank}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def ray_train_worker(config: dict) -> None:
    """The ``train_loop_per_worker`` of the TorchTrainer: Ray has set up torch.distributed."""
    spec: TrainSpec = config["spec"]
    torch.set_num_threads(max(1, int(spec.training.resources_per_worker.CPU)))
    train(spec, RayTrainSession())


def torchrun_main(argv: list[str] | None = None) -> None:
    """``torchrun --nproc-per-node N -m trainers.loop exp.yaml``: the loop without Ray (one JSON
    line of metrics per report on rank 0; checkpoints under tracking.output_dir or ./trdpo_runs)."""
    import argparse
    import json

    import yaml

    parser = argparse.ArgumentParser(description=torchrun_main.__doc__)
    parser.add_argument("config")
    parser.add_argument("--output-dir", default="trdpo_runs/torchrun")
    args = parser.parse_args(argv)
    tree = yaml.safe_load(Path(args.config).read_text())
    spec = TrainSpec(ModelConfig(**tree["model"]), TokenizerConfig(**tree.get("tokenizer", {})),
                     DataConfig(**tree["data"]), TrainingConfig(**tree["training"]), args.output_dir)
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")

    def on_report(metrics: dict, saved: Path | None) -> None:
        print(json.dumps({"metrics": metrics, "checkpoint": str(saved) if saved else None}), flush=True)

    try:
        train(spec, LocalSession(on_report, Path(args.output_dir) / "checkpoints", spec.training.keep_checkpoints))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    torchrun_main()


__all__ = ["LocalSession", "RayTrainSession", "Session", "TrainSpec", "export_policy", "full_model_state",
           "ray_train_worker", "train"]
