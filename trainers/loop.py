"""The per-worker TR-DPO / SFT training loop: one flat function, top to bottom.

    policy, reference, initial <- one read of the starting weights, sharded alike (FSDP2)
    resume from the newest complete checkpoint of this run, if any
    for step in 1..total_steps:
        the step's global batch of pairs (a pure function of seed and step), cut into micro-batches
        (packed: as many pairs as fit a token budget, the same count on every rank)
        for each micro-batch: one forward of its chosen and rejected sequences through policy (and
                              reference, no_grad), per-sequence log-probs (chunked through the
                              lm_head), DPO/IPO loss with each pair weighing 1/G, backward
                              (gradients reduced on the last micro-batch only)
        clip (the pre-clip norm is the paper's stability signal), AdamW step, LR schedule
        if step % tau == 0: reference <- alpha*policy + (1-alpha)*reference   (shard-local)
        at logged steps: read the step's statistics (one reduction, one host read);
        every eval_every: validation against the *initial* model;
        every checkpoint_every: every rank saves its shards
    export the policy as a Hugging Face safetensors directory

It runs in one process (``LocalSession``), under torchrun, or as a Ray Train worker function
(``ray_train_worker``); with more than one worker the models are FSDP2-sharded over a device mesh.

    trdpo train experiments/demo.yaml --set training.ref_update=soft --set training.alpha=0.6
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from trainers.checkpoint import checkpoint_name, find_resume_checkpoint, load_checkpoint, save_checkpoint
from trainers.config import DataConfig, ModelConfig, TokenizerConfig, TrainingConfig
from trainers.batching import DataOrder, collate
from trainers.data import LoadReport, TokenizedPair, load_examples, tokenize_examples
from trainers.distributed import DeviceTotals, build_models, device_for_rank, local_tensors, use_bf16
from trainers.export import export_policy
from trainers.models import build_tokenizer
from trainers.process_group import has_process_group, is_distributed
from trainers.sessions import LocalSession, RayTrainSession, Session
from trainers.storage import Storage
from trainers.scoring import Scorer, resolve_fast_paths
from trainers.trdpo import PreferenceLogps, ReferenceUpdater, preference_loss
from trainers.validation import preference_validation, sft_validation

CHECKPOINTS = "checkpoints"  # under the run's storage: one directory per attempt, checkpoints in each
POLICY = "policy"  # under the run's storage: the exported Hugging Face policy


def policy_at(step: int) -> str:
    """Where a policy exported along the way lives in the run's storage."""
    return f"policy-step{step:08d}"


@dataclass
class TrainSpec:
    """What a worker needs: the trainers' config sections and where the run lives."""

    model: ModelConfig
    tokenizer: TokenizerConfig
    data: DataConfig
    training: TrainingConfig
    run_uri: str  # the run's storage (path or URI): checkpoints under checkpoints/, the policy under policy/
    fault_injection: str | None = None  # "STEP:RANK": that worker kills itself once (tests only)
    # Called on rank 0 with every logged step's metrics (the orchestrator passes an MLflow logger:
    # logging straight from rank 0 keeps ray.train.report, a synchronisation point, for the steps
    # that need it: validation and checkpoints).
    step_logger: Callable[[dict], None] | None = None


# ------------------------------------------------------------------------------------ helpers


# Hugging Face Trainer's (and TRL's) rule: no weight decay on biases and normalisation weights.
NO_DECAY_PATTERNS = ("bias", "layernorm", "rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def make_optimizer(policy: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(policy, [torch.nn.LayerNorm], list(NO_DECAY_PATTERNS)))
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=cfg.adam_betas)


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


def model_state_bytes(models: list, optimizer) -> int:
    """Bytes this rank holds for parameters, gradients and optimizer state (its shards under FSDP)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    unique = list({id(m): m for m in models if m is not None}.values())
    tensors = [p for model in unique for p in model.parameters()]
    tensors += [p.grad for p in tensors if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class StepTotals(DeviceTotals):
    """One optimizer step's sums over its micro-batches (read only at logged steps)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    chosen_logps: torch.Tensor
    pairs: torch.Tensor
    tokens: torch.Tensor  # real tokens
    slots: torch.Tensor  # positions computed, padding included


def load_pairs(spec: TrainSpec, tokenizer, rank: int) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Tokenized training and validation pairs; rank 0 prints what was read, kept and skipped for
    both splits (bad rows are never dropped silently)."""
    pairs = []
    for split in ("train", "validation"):
        examples, report = load_examples(spec.data, split)
        if split == "validation" and not (spec.data.validation_path or spec.data.validation_split):
            report = LoadReport(f"{report.source} (held-out tail)", rows_read=len(examples), kept=len(examples))
        pairs.append(tokenize_examples(examples, tokenizer, spec.data, report.source, report))
        if rank == 0:
            print(f"[trdpo] {split}: {report.summary()}", flush=True)
    return pairs[0], pairs[1]


# ------------------------------------------------------------------------------------ the loop


def train(spec: TrainSpec, session: Session) -> dict:
    """Run the training described by ``spec``; returns the final metrics. Collective under FSDP."""
    cfg, rank, world = spec.training, session.rank, session.world_size
    device = device_for_rank()
    bf16 = use_bf16(cfg.precision, device)
    preference = cfg.stage == "trdpo"
    distributed = is_distributed()

    tokenizer = build_tokenizer(spec.model, spec.tokenizer)
    pad_id = tokenizer.pad_token_id
    train_pairs, val_pairs = load_pairs(spec, tokenizer, rank)
    order = DataOrder(train_pairs, cfg, world, not preference, spec.data.max_length)  # before the models: fails fast
    steps = order.total_steps()

    models = build_models(spec.model, tokenizer, preference=preference, moving_reference=cfg.ref_update != "none",
                          device=device, bf16=bf16, activation_checkpointing=cfg.activation_checkpointing,
                          shard_one_worker=cfg.shard_one_worker)
    policy, reference, initial = models.policy, models.reference, models.initial
    cfg, fallbacks = resolve_fast_paths(policy, cfg)
    max_length = spec.data.max_length
    # One scorer per distinct model (the initial model is the reference itself when it never moves).
    policy_scorer = Scorer(policy, cfg, bf16)
    reference_scorer = Scorer(reference, cfg, bf16) if reference is not None else None
    initial_scorer = reference_scorer if initial is reference else Scorer(initial, cfg, bf16) if initial is not None else None
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    updater = ReferenceUpdater(**cfg.ref_update_kwargs) if preference else None
    if reference is not None:
        if [n for n, _ in policy.named_parameters()] != [n for n, _ in reference.named_parameters()]:
            raise RuntimeError("policy and reference parameters differ: the shard-local update would pair wrong tensors")
        policy_local, reference_local = local_tensors(policy), local_tensors(reference)

    run_store = Storage(spec.run_uri)
    checkpoints = run_store.child(CHECKPOINTS)
    # One rank decides, so that every rank loads the same checkpoint; an error deciding (a store
    # that does not answer) reaches every rank, which would otherwise wait in the broadcast.
    resume, skipped, failure = None, [], None
    if rank == 0:
        try:
            resume, skipped = find_resume_checkpoint(checkpoints)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            failure = exc
    if distributed:
        decision = [resume, failure if rank != 0 or failure is None else _portable(failure)]
        dist.broadcast_object_list(decision, src=0)
        resume = decision[0]
        failure = failure if rank == 0 else decision[1]  # rank 0 keeps its own, with its traceback
    if failure is not None:
        raise failure
    start_step = 0
    if resume is not None:
        state = load_checkpoint(checkpoints, resume, policy=policy, reference=reference, optimizer=optimizer,
                                scheduler=scheduler, rank=rank)
        start_step = state.step
        if updater is not None:
            updater.load_state_dict(state.updater)
    if rank == 0:
        for line in skipped + fallbacks:
            print(f"[trdpo] {line}", flush=True)
        where = f"resuming from {checkpoints.uri_of(resume)} (step {start_step})" if resume else "starting at step 0"
        layout = "packed" if cfg.packing else "padded"
        head = f"log-probs in chunks of {cfg.logprob_chunk_tokens} tokens" if cfg.logprob_chunk_tokens else "whole logits"
        print(f"[trdpo] {cfg.stage}: {len(train_pairs)} train / {len(val_pairs) or 'no'} val pairs, {steps} steps of "
              f"{order.global_batch} pairs, {world} worker(s), ref_update={cfg.ref_update}, {layout} batches, {head}; "
              f"{where}", flush=True)

    def validation() -> dict:
        policy.eval()
        if preference:
            out = preference_validation(val_pairs, policy_scorer, initial_scorer, cfg, max_length, pad_id, device, rank, world)
        else:
            out = sft_validation(val_pairs, policy_scorer, cfg, max_length, pad_id, device, rank, world)
        policy.train()
        return out

    def checkpoint(step: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix=f"trdpo-ckpt-{rank}-") as tmp:
            save_checkpoint(Path(tmp), policy=policy, reference=reference, optimizer=optimizer, scheduler=scheduler,
                            updater_state=updater.state_dict() if updater else {}, step=step, rank=rank, world=world)
            session.report(metrics, checkpoint_dir=Path(tmp), checkpoint_name=checkpoint_name(step))

    # Each pair weighs 1/G of the step's loss whatever micro-batch it lands in; FSDP averages the
    # gradients over ranks, hence the factor world (a rank's micro-batches may hold unequal pair counts).
    pair_weight = world / order.global_batch
    started, window_pairs, window_tokens, metrics = time.perf_counter(), 0.0, 0.0, {}
    window_max_grad = torch.zeros((), device=device)
    state_mb = 0.0
    for step in range(start_step + 1, steps + 1):
        totals = StepTotals.zeros(device)
        micro_batches = order.micro_batches(step, rank, max_length, cfg)
        for i, micro in enumerate(micro_batches):
            if distributed and cfg.defer_gradient_sync:  # reduce-scatter once per step, after the last micro-batch
                policy.set_requires_gradient_sync(i == len(micro_batches) - 1)
            cpu_batch = collate(micro, pad_id, cfg, max_length, chosen_only=not preference)
            batch, weights = cpu_batch.to(device), micro.weights.to(device)
            scores = policy_scorer.sequence_logps(batch, average=cfg.average_log_prob or not preference)[0]
            n = batch.num_pairs
            if preference:
                with torch.no_grad():
                    ref_scores = reference_scorer.sequence_logps(batch, average=cfg.average_log_prob)[0]
                out = preference_loss(cfg.loss, PreferenceLogps(scores[:n], scores[n:], ref_scores[:n], ref_scores[n:]), cfg.beta, cfg.label_smoothing)
                losses = out.losses * weights
                totals.add(loss=losses, chosen_rewards=out.chosen_rewards * weights, rejected_rewards=out.rejected_rewards * weights,
                           accuracy=out.accuracy * weights, chosen_logps=scores[:n] * weights)
            else:
                losses = -scores * weights  # per-token mean NLL of each chosen response
                totals.add(loss=losses, chosen_logps=scores * weights)
            # Counted on the host copy: no device sync.
            if micro.weights.any():  # a stand-in's tokens are no work done for the run
                totals.add(pairs=float(micro.weights.sum()), tokens=float(cpu_batch.num_tokens), slots=float(cpu_batch.num_slots))
            (losses.sum() * pair_weight).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        window_max_grad = torch.maximum(window_max_grad, grad_norm.detach())
        optimizer.step()
        if step == start_step + 1:  # parameters, gradients and optimizer state all exist now
            state_mb = model_state_bytes([policy, reference, initial], optimizer) / 2**20
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        updated = updater.maybe_update(step, reference_local, policy_local) if updater else False
        maybe_inject_fault(spec, step, rank)

        is_last = step == steps
        evaluate = bool(cfg.eval_every and step % cfg.eval_every == 0) or is_last
        save = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or is_last
        if step % cfg.log_every == 0 or updated or evaluate or save:
            t = totals.reduced()
            count = t["pairs"]
            window_pairs, window_tokens = window_pairs + count, window_tokens + t["tokens"]
            elapsed = time.perf_counter() - started
            metrics = {
                "step": step, "train/loss": t["loss"] / count, "train/logps/chosen": t["chosen_logps"] / count,
                "train/grad_norm": float(grad_norm), "train/grad_norm_max": float(window_max_grad),
                "train/learning_rate": scheduler.get_last_lr()[0],
                "train/pairs_per_s": window_pairs / elapsed, "train/tokens_per_s": window_tokens / elapsed,
                "train/padding_fraction": 1.0 - t["tokens"] / t["slots"],
                "train/progress": step / steps,
                "system/model_state_mb_rank0": state_mb,
                "system/peak_memory_mb_rank0": peak_memory_bytes(device) / 2**20,
            }
            if preference:
                metrics.update({
                    "train/rewards/chosen": t["chosen_rewards"] / count, "train/rewards/rejected": t["rejected_rewards"] / count,
                    "train/rewards/margins": (t["chosen_rewards"] - t["rejected_rewards"]) / count,
                    "train/rewards/accuracy": t["accuracy"] / count,
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
            started, window_pairs, window_tokens = time.perf_counter(), 0.0, 0.0
            window_max_grad = torch.zeros((), device=device)
        if step in cfg.export_steps and not is_last:  # a policy along the way, for the quality-vs-KL curve
            export_policy(policy, spec.model, tokenizer, run_store, policy_at(step), rank)
    export_policy(policy, spec.model, tokenizer, run_store, POLICY, rank)
    return metrics


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (to reach the other ranks), else a RuntimeError naming it."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send its description instead
        return RuntimeError(f"rank 0 failed while choosing the checkpoint to resume from: {error!r}")


def maybe_inject_fault(spec: TrainSpec, step: int, rank: int) -> None:
    """Chaos hook for the fault-tolerance tests: ``fault_injection="STEP:RANK"`` (set from the
    driver's ``TRDPO_FAULT_KILL``) makes that worker SIGKILL itself once, right after that step;
    a marker file in the run's storage keeps it to the first attempt."""
    target = spec.fault_injection
    if not target or tuple(map(int, target.split(":"))) != (step, rank):
        return
    store, marker = Storage(spec.run_uri), f"fault-injected-{step}-{rank}"
    if store.exists(marker):
        return
    store.write_text("killed", marker)
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def ray_train_worker(config: dict) -> None:
    """The ``train_loop_per_worker`` of the TorchTrainer: Ray has set up torch.distributed."""
    spec: TrainSpec = config["spec"]
    torch.set_num_threads(max(1, int(spec.training.resources_per_worker.CPU)))
    train(spec, RayTrainSession(Storage(spec.run_uri).child(CHECKPOINTS), spec.training.keep_checkpoints))


def torchrun_main(argv: list[str] | None = None) -> None:
    """``torchrun --nproc-per-node N -m trainers.loop exp.yaml``: the loop without Ray. Rank 0 prints
    one JSON line per logged step (``{"metrics": ...}``) and one per checkpoint
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
