"""What a logged step reports: the step's sums (kept on the device until then), throughput over
every step since the last logged one, the window's largest gradient norm, and memory."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from trainers.model.sharding import DeviceTotals, reduced_together

# The clock throughput is timed with; a test replaces it to control time.
clock = time.perf_counter


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
    layout_flops: torch.Tensor  # estimated forward FLOPs of the chosen layouts (default path only)
    attention_flops: torch.Tensor  # of which in attention scores
    micro_batches: torch.Tensor  # micro-batches laid out by cost
    packed_micro_batches: torch.Tensor  # of which in packed rows


@dataclass
class WindowTotals(DeviceTotals):
    """The work of every step since the last logged one (the throughput's numerator)."""

    pairs: torch.Tensor
    tokens: torch.Tensor  # real tokens


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


class LogWindow:
    """The steps since the last logged one: when they started, the pairs and tokens they trained
    on and their largest gradient norm (device tensors, so that no step waits for the host)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.started = clock()
        self.work = WindowTotals.zeros(self.device)
        self.max_grad_norm = torch.zeros((), device=self.device)

    def saw_step(self, totals: StepTotals, grad_norm: torch.Tensor) -> None:
        """Adds one optimizer step (every step, logged or not) to the window."""
        self.work.add(pairs=totals.pairs, tokens=totals.tokens)
        self.max_grad_norm = torch.maximum(self.max_grad_norm, grad_norm.detach())

    def metrics(self, step: int, steps: int, totals: StepTotals, grad_norm: torch.Tensor, learning_rate: float,
                state_mb: float, updater=None, updated: bool = False) -> dict:
        """The logged step's metrics (one reduction over ranks, one host read); ``updater``: a
        preference run's reference updater, whose rewards and updates are reported too."""
        t, work = reduced_together(totals, self.work)
        count = t["pairs"]
        elapsed = clock() - self.started
        metrics = {
            "step": step, "train/loss": t["loss"] / count, "train/logps/chosen": t["chosen_logps"] / count,
            "train/grad_norm": float(grad_norm), "train/grad_norm_max": float(self.max_grad_norm),
            "train/learning_rate": learning_rate,
            "train/pairs_per_s": work["pairs"] / elapsed, "train/tokens_per_s": work["tokens"] / elapsed,
            "train/padding_fraction": 1.0 - t["tokens"] / t["slots"],
            "train/progress": step / steps,
            "system/model_state_mb_rank0": state_mb,
            "system/peak_memory_mb_rank0": peak_memory_bytes(self.device) / 2**20,
        }
        if t["micro_batches"]:  # laid out by cost (the padded reference path has no estimate: absent)
            metrics["train/attention_share"] = t["attention_flops"] / t["layout_flops"]
            metrics["train/packed_fraction"] = t["packed_micro_batches"] / t["micro_batches"]
        if updater is not None:
            metrics.update({
                "train/rewards/chosen": t["chosen_rewards"] / count, "train/rewards/rejected": t["rejected_rewards"] / count,
                "train/rewards/margins": (t["chosen_rewards"] - t["rejected_rewards"]) / count,
                "train/rewards/accuracy": t["accuracy"] / count,
                "train/ref_updates": updater.n_updates, "train/ref_updated": float(updated),
            })
        return metrics
