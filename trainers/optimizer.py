"""The optimizer and its learning-rate schedule, as the loop builds them before step 1."""

from __future__ import annotations

import math

import torch

from trainers.config import TrainingConfig

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
    """Linear warmup over ``warmup_steps``, then linear or cosine decay to 0 at ``steps`` (or constant)."""
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
