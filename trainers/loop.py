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
(both in ``trainers.entrypoints``); with more than one worker the models are FSDP2-sharded over a
device mesh. Beside it: the optimizer and schedule (``trainers.optimizer``), the data order
(``trainers.data.batching``), what a logged step reports (``trainers.step_metrics``).

    trdpo train experiments/demo.yaml --set training.ref_update=soft --set training.alpha=0.6
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from trainers.data.batching import DataOrder, collate
from trainers.state.checkpoint import checkpoint_name, choose_resume_checkpoint, load_checkpoint, save_checkpoint
from trainers.config import TrainingConfig, TrainSpec
from trainers.data.loading import load_pairs
from trainers.model.sharding import build_models, device_for_rank, local_tensors, use_bf16
from trainers.state.export import export_policy
from trainers.model.build import build_tokenizer
from trainers.optimizer import make_optimizer, make_scheduler
from trainers.process_group import is_distributed
from trainers.model.lora import INITIAL, REFERENCE
from trainers.model.scoring import Scorer, resolve_fast_paths
from trainers.sessions import Session
from trainers.step_metrics import LogWindow, StepTotals, model_state_bytes
from trainers.state.storage import Storage
from trainers.trdpo import PreferenceLogps, ReferenceUpdater, preference_loss
from trainers.validation import preference_validation, sft_validation

CHECKPOINTS = "checkpoints"  # under the run's storage: one directory per attempt, checkpoints in each
POLICY = "policy"  # under the run's storage: the exported Hugging Face policy


def policy_at(step: int) -> str:
    """Where a policy exported along the way lives in the run's storage."""
    return f"policy-step{step:08d}"


def train(spec: TrainSpec, session: Session) -> dict:
    """Run the training described by ``spec``; returns the final metrics. Collective under FSDP."""
    cfg, rank, world = spec.training, session.rank, session.world_size
    device = device_for_rank()
    bf16 = use_bf16(cfg.precision, device)
    preference = cfg.stage == "trdpo"
    distributed = is_distributed()

    tokenizer = build_tokenizer(spec.model, spec.tokenizer)
    pad_id, max_length = tokenizer.pad_token_id, spec.data.max_length
    train_pairs, val_pairs = load_pairs(spec.data, tokenizer, rank)
    order = DataOrder(train_pairs, cfg, world, not preference, max_length)  # before the models: fails fast
    steps = order.total_steps()

    models = build_models(spec.model, tokenizer, preference=preference, moving_reference=cfg.ref_update != "none",
                          device=device, bf16=bf16, activation_checkpointing=cfg.activation_checkpointing,
                          shard_one_worker=cfg.shard_one_worker, ref_update=cfg.ref_update, alpha=cfg.alpha)
    policy, reference, initial, roles = models.policy, models.reference, models.initial, models.roles
    cfg, fallbacks = resolve_fast_paths(policy, cfg)
    policy_scorer = Scorer(policy, cfg, bf16)
    if roles is not None:  # LoRA: one module, each role an adapter switch around its forward
        reference_scorer = policy_scorer.as_role(lambda: roles.active(REFERENCE)) if preference else None
        initial_scorer = policy_scorer.as_role(lambda: roles.active(INITIAL)) if preference else None
    else:  # one scorer per distinct model (the initial model is the reference itself when it never moves)
        reference_scorer = Scorer(reference, cfg, bf16) if reference is not None else None
        initial_scorer = reference_scorer if initial is reference else Scorer(initial, cfg, bf16) if initial is not None else None
    optimizer = make_optimizer(policy, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    updater = ReferenceUpdater(**cfg.ref_update_kwargs) if preference else None
    if reference is not None and roles is None:
        policy_local, reference_local = _paired_local_tensors(policy, reference)

    run_store = Storage(spec.run_uri)
    checkpoints = run_store.child(CHECKPOINTS)
    resume, skipped = choose_resume_checkpoint(checkpoints, rank, distributed)
    start_step = 0
    if resume is not None:
        state = load_checkpoint(checkpoints, resume, policy=policy, reference=None if roles else reference,
                                optimizer=optimizer, scheduler=scheduler, rank=rank, adapters_only=roles is not None)
        start_step = state.step
        if updater is not None:
            updater.load_state_dict(state.updater)
        if roles is not None:
            roles.load_state_dict(state.updater.get("lora", {}))
    if rank == 0:
        where = f"resuming from {checkpoints.uri_of(resume)} (step {start_step})" if resume else "starting at step 0"
        _announce(cfg, skipped + fallbacks, len(train_pairs), len(val_pairs), steps, order.global_batch, world, where)

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
            updater_state = updater.state_dict() if updater else {}
            if roles is not None:  # the error bound of the reference adapter travels with the updater's state
                updater_state["lora"] = roles.state_dict()
            save_checkpoint(Path(tmp), policy=policy, reference=None if roles else reference, optimizer=optimizer,
                            scheduler=scheduler, updater_state=updater_state, step=step, rank=rank, world=world,
                            adapters_only=roles is not None)
            session.report(metrics, checkpoint_dir=Path(tmp), checkpoint_name=checkpoint_name(step))

    # Each pair weighs 1/G of the step's loss whatever micro-batch it lands in; FSDP averages the
    # gradients over ranks, hence the factor world (a rank's micro-batches may hold unequal pair counts).
    pair_weight = world / order.global_batch
    window, metrics, state_mb = LogWindow(device), {}, 0.0
    for step in range(start_step + 1, steps + 1):
        totals = StepTotals.zeros(device)
        micro_batches = order.micro_batches(step, rank, max_length, cfg)
        for i, micro in enumerate(micro_batches):
            if distributed and cfg.defer_gradient_sync:  # reduce-scatter once per step, after the last micro-batch
                policy.set_requires_gradient_sync(i == len(micro_batches) - 1)
            cpu_batch = collate(micro, pad_id, cfg, max_length, chosen_only=not preference, cost=policy_scorer.layout_cost)
            batch, weights = cpu_batch.to(device), micro.weights.to(device)
            losses = _weighted_losses(batch, weights, policy_scorer, reference_scorer, cfg, preference, totals)
            # Counted on the host copy: no device sync.
            if micro.weights.any():  # a stand-in's tokens are no work done for the run
                totals.add(pairs=float(micro.weights.sum()), tokens=float(cpu_batch.num_tokens), slots=float(cpu_batch.num_slots))
                if cpu_batch.estimate is not None:  # the cost model's view of the layout it chose
                    totals.add(layout_flops=cpu_batch.estimate.total, attention_flops=cpu_batch.estimate.attention,
                               micro_batches=1.0, packed_micro_batches=float(cpu_batch.packed))
            (losses.sum() * pair_weight).backward()
        grad_norm = _clip_gradients(policy, cfg.max_grad_norm)
        window.saw_step(totals, grad_norm)
        optimizer.step()
        if step == start_step + 1:  # parameters, gradients and optimizer state all exist now
            state_mb = model_state_bytes([policy, reference, initial], optimizer) / 2**20
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if updater is None:
            updated = False
        elif roles is not None:  # LoRA: the rule applied to the adapters' factors, in weight space
            updated = updater.maybe_update(step, apply=lambda: roles.update_reference(cfg.alpha))
        else:
            updated = updater.maybe_update(step, reference_local, policy_local)
        if spec.after_step is not None:
            spec.after_step(spec.run_uri, step, rank)

        is_last = step == steps
        evaluate = bool(cfg.eval_every and step % cfg.eval_every == 0) or is_last
        save = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or is_last
        if step % cfg.log_every == 0 or updated or evaluate or save:
            metrics = window.metrics(step, steps, totals, grad_norm, scheduler.get_last_lr()[0], state_mb, updater, updated)
            if roles is not None and updater is not None:
                metrics.update(roles.metrics(updater.n_updates))
            if evaluate:
                metrics.update(validation())
            if rank == 0 and spec.step_logger is not None:
                spec.step_logger(metrics)
            if save:
                checkpoint(step, metrics)
            elif evaluate:
                session.report(metrics)
            window.reset()
        if step in cfg.export_steps and not is_last:  # a policy along the way, for the quality-vs-KL curve
            export_policy(policy, spec.model, tokenizer, run_store, policy_at(step), rank)
    if start_step >= steps:  # resumed at the last checkpoint: its report may have been cut off after it was stored
        session.report(metrics := {"step": steps, **validation()})
    export_policy(policy, spec.model, tokenizer, run_store, POLICY, rank)
    return metrics


def _paired_local_tensors(policy: torch.nn.Module, reference: torch.nn.Module) -> tuple[list, list]:
    """The local shards of policy and reference, in the same order: what the shard-local update pairs."""
    if [n for n, _ in policy.named_parameters()] != [n for n, _ in reference.named_parameters()]:
        raise RuntimeError("policy and reference parameters differ: the shard-local update would pair wrong tensors")
    return local_tensors(policy), local_tensors(reference)


def _clip_gradients(policy: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clips to ``max_norm`` (None: not at all) and returns the pre-clip norm: the paper's stability signal."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm or float("inf"))
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm


def _weighted_losses(batch, weights: torch.Tensor, policy_scorer: Scorer, reference_scorer: Scorer | None,
                     cfg: TrainingConfig, preference: bool, totals: StepTotals) -> torch.Tensor:
    """One micro-batch's per-pair losses, each weighted by its pair's weight (0 for a stand-in),
    with the step's sums added to ``totals``: DPO/IPO against the reference, or SFT's NLL."""
    scores = policy_scorer.sequence_logps(batch, average=cfg.average_log_prob or not preference)[0]
    n = batch.num_pairs
    if not preference:
        losses = -scores * weights  # per-token mean NLL of each chosen response
        totals.add(loss=losses, chosen_logps=scores * weights)
        return losses
    with torch.no_grad():
        ref_scores = reference_scorer.sequence_logps(batch, average=cfg.average_log_prob)[0]
    out = preference_loss(cfg.loss, PreferenceLogps(scores[:n], scores[n:], ref_scores[:n], ref_scores[n:]), cfg.beta, cfg.label_smoothing)
    losses = out.losses * weights
    totals.add(loss=losses, chosen_rewards=out.chosen_rewards * weights, rejected_rewards=out.rejected_rewards * weights,
               accuracy=out.accuracy * weights, chosen_logps=scores[:n] * weights)
    return losses


def _announce(cfg: TrainingConfig, notes: list[str], train_pairs: int, val_pairs: int, steps: int, global_batch: int,
              world: int, where: str) -> None:
    """Rank 0's lines before step 1: what was skipped or fell back, and what is about to run."""
    for line in notes:
        print(f"[trdpo] {line}", flush=True)
    layout = "packed" if cfg.packing else "padded"
    head = f"log-probs in chunks of {cfg.logprob_chunk_tokens} tokens" if cfg.logprob_chunk_tokens else "whole logits"
    print(f"[trdpo] {cfg.stage}: {train_pairs} train / {val_pairs or 'no'} val pairs, {steps} steps of "
          f"{global_batch} pairs, {world} worker(s), ref_update={cfg.ref_update}, {layout} batches, {head}; "
          f"{where}", flush=True)
