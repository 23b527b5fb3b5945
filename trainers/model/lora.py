"""LoRA TR-DPO: one frozen base model, every role a switch of adapters (PEFT), no model copies.

    policy     base + adapter "policy"       (trainable; the only parameters the optimizer sees)
    reference  base + adapter "reference"    (frozen; moved by the TR-DPO rule, in weight space)
    initial    base with adapters disabled   (validation's KL; also the reference of ref_update none)

The reference adapter uses the policy adapter's PEFT scaling ``s`` (its ``lora_alpha`` is set so that
``alpha / rank`` is the policy's, and the per-layer value is then copied, so that no rounding of
``alpha·R/r / R`` makes them differ): both deltas are ``s·B·A`` with the same ``s``, so the update
rules of :mod:`trainers.trdpo.lowrank`, which work on unscaled factors, are the weight-space rule.

Its rank: ``lora.soft_rank`` for soft (room for the weighted sum of several policy deltas), the
policy's rank for hard (an exact copy). ``ref_update: none`` has no reference adapter: the
reference is the initial model, the base with adapters off (as TRL and torchtune do).

The reference adapter starts with both factors zero (PEFT would draw ``A`` at random, harmless with
``B = 0``, but the low-rank update treats unused columns as zero): at step 0 reference, policy
(``B = 0``) and initial model are all the base, so the DPO loss is ln 2.

Switching roles sets each LoRA layer's active adapter directly rather than through PEFT's
``set_adapter``, which also flips ``requires_grad`` (it would make the reference trainable and the
policy frozen for as long as the reference is scored).

Each adapted linear layer adds its adapter's delta to the base output in place
(:func:`fused_lora_forward`): PEFT's ``result + lora_B(lora_A(x)) * scaling`` makes three
``[tokens, out]`` tensors besides the base output, freed at once. They are not kept for the
backward, but on CPU glibc's heap keeps what they leave between the saved activations: measured
on GPT-NeoX 8 x 512, 8 pairs of length 512, fp32 (benchmarks/memory.py), the peak step RSS was
3,485 MB with PEFT's sum and 2,645 MB fused, against ~2,000 MB of live tensors and model state.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Iterator

import torch

from trainers.config import LoraConfig
from trainers.trdpo.lowrank import LowRankErrorBound, lowrank_hard_update_, lowrank_soft_update_

POLICY, REFERENCE, INITIAL = "policy", "reference", "initial"
ADAPTER_KEY = "lora_"  # every PEFT LoRA parameter's name holds it (lora_A, lora_B)


def is_adapter_key(name: str) -> bool:
    return f".{ADAPTER_KEY}" in name


def _peft_config(cfg: LoraConfig, rank: int, lora_alpha: float, dropout: float):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=dropout, target_modules=cfg.target_modules,
                          bias="none", task_type="CAUSAL_LM")


def reference_rank(cfg: LoraConfig, ref_update: str) -> int | None:
    """Columns of the reference adapter: None when there is none (``ref_update: none``)."""
    return {"none": None, "hard": cfg.rank, "soft": cfg.soft_rank}[ref_update]


def attach_adapters(base: torch.nn.Module, cfg: LoraConfig, ref_update: str):
    """``base`` (frozen, cast to ``cfg.base_dtype``) wrapped in a PEFT model with the adapters of the
    module docstring; the adapters are float32 whatever the base's dtype."""
    from peft import get_peft_model

    if cfg.base_dtype == "bf16":
        base.to(torch.bfloat16)
    model = get_peft_model(base, _peft_config(cfg, cfg.rank, cfg.alpha, cfg.dropout), adapter_name=POLICY,
                           autocast_adapter_dtype=True)
    rank = reference_rank(cfg, ref_update)
    if rank is not None:
        model.add_adapter(REFERENCE, _peft_config(cfg, rank, cfg.alpha * rank / cfg.rank, 0.0))
    for layer in lora_layers(model):
        for adapter in layer.lora_A:
            layer.lora_A[adapter].to(torch.float32)
            layer.lora_B[adapter].to(torch.float32)
        if rank is not None:
            layer.scaling[REFERENCE] = layer.scaling[POLICY]
            with torch.no_grad():
                layer.lora_A[REFERENCE].weight.zero_()
                layer.lora_B[REFERENCE].weight.zero_()
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if is_adapter_key(name) and f".{POLICY}." in name:
            parameter.requires_grad_(True)
    _activate(model, POLICY)
    fuse_adapter_sums(model)
    return model


def fuse_adapter_sums(model: torch.nn.Module) -> None:
    """Every plain PEFT LoRA linear layer of ``model`` adds its delta in place (:func:`fused_lora_forward`)."""
    from peft.tuners.lora.layer import Linear

    for layer in lora_layers(model):
        if type(layer) is Linear:  # not the quantized or convolutional kinds: PEFT's own forward there
            layer.forward = types.MethodType(fused_lora_forward, layer)


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` with each active adapter's ``s·B(A(dropout(x)))`` added into the
    base output in place (one ``addmm_`` of the rank-r activations), so that the only ``[tokens, out]``
    tensor is the output itself. The base output is no input of any backward (a linear layer saves its
    input and weight), so autograd allows it; gradients are PEFT's. Where the dtypes differ (a bf16
    base without autocast: PEFT sums in fp32, then rounds) the delta is added as PEFT adds it; where
    this does not apply (adapters off or merged, per-sample adapters, DoRA and other variants, extra
    arguments) PEFT's own forward runs."""
    active = [name for name in self.active_adapters if name in self.lora_A]
    if self.disable_adapters or self.merged or args or kwargs or any(name in self.lora_variant for name in active):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    result_dtype = result.dtype
    for name in active:
        hidden = self.lora_A[name](self.lora_dropout[name](self._cast_input_dtype(x, self.lora_A[name].weight.dtype)))
        weight = self.lora_B[name].weight
        if torch.is_autocast_enabled(hidden.device.type):  # what autocast does to lora_B's linear
            weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
        if result.dtype == hidden.dtype == weight.dtype and result.is_contiguous() and self.lora_B[name].bias is None:
            result.view(-1, result.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), weight.t(), alpha=self.scaling[name])
        else:
            result = result + self.lora_B[name](hidden) * self.scaling[name]
    return result.to(result_dtype)


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every adapted layer, in module order (the same on every rank)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _activate(model: torch.nn.Module, adapter: str) -> None:
    for layer in lora_layers(model):
        layer._active_adapter = [adapter]


@dataclass
class AdapterRoles:
    """The roles of one PEFT model, and the reference adapter's update (see the module docstring)."""

    model: torch.nn.Module
    ref_update: str
    rtol: float = 1e-6
    error_bound: LowRankErrorBound | None = None  # soft only: how far the stored reference may be from the rule

    def __post_init__(self) -> None:
        self.layers = lora_layers(self.model)

    @classmethod
    def for_run(cls, model: torch.nn.Module, cfg: LoraConfig, ref_update: str, alpha: float | None) -> "AdapterRoles":
        bound = LowRankErrorBound(alpha) if ref_update == "soft" else None
        return cls(model, ref_update, cfg.reference_rtol, bound)

    @contextlib.contextmanager
    def active(self, role: str) -> Iterator[None]:
        """Score as ``role`` inside the block; the policy is active again after it. The other roles
        are frozen models: evaluation mode (no dropout) for as long as they are scored."""
        if role == POLICY:
            yield
            return
        was_training = self.model.training
        self.model.eval()
        try:
            if role == INITIAL or (role == REFERENCE and self.ref_update == "none"):
                with self.model.disable_adapter():
                    yield
            elif role == REFERENCE:
                _activate(self.model, REFERENCE)
                try:
                    yield
                finally:
                    _activate(self.model, POLICY)
            else:
                raise ValueError(f"unknown role {role!r}")
        finally:
            self.model.train(was_training)

    def factors(self, adapter: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(B, A)`` weights of ``adapter`` per layer (DTensors under FSDP2)."""
        return [(layer.lora_B[adapter].weight, layer.lora_A[adapter].weight) for layer in self.layers]

    @torch.no_grad()
    def update_reference(self, alpha: float | None) -> None:
        """Apply the run's rule once: hard copies the policy's factors into the reference adapter
        (equal ranks: a plain copy, shard-local under FSDP2, bitwise); soft replaces the reference's
        delta by ``α·ΔW_policy + (1 − α)·ΔW_ref``, recompressed to its rank (full factors gathered,
        each rank keeps its slice), and advances the error bound."""
        pairs = zip(self.factors(REFERENCE), self.factors(POLICY))
        if self.ref_update == "hard":
            for (ref_B, ref_A), (pol_B, pol_A) in pairs:
                lowrank_hard_update_(_local(ref_B), _local(ref_A), _local(pol_B), _local(pol_A))
            return
        updates = []
        for (ref_B, ref_A), (pol_B, pol_A) in pairs:
            full_ref_B, full_ref_A = _full(ref_B), _full(ref_A)
            updates.append(lowrank_soft_update_(full_ref_B, full_ref_A, _full(pol_B), _full(pol_A), alpha, self.rtol))
            _write_full_(ref_B, full_ref_B)
            _write_full_(ref_A, full_ref_A)
        self.error_bound.update(updates)

    def metrics(self, n_updates: int) -> dict:
        """``ref/lora_error`` once a soft update happened (absent before, and for other rules)."""
        if self.error_bound is None or n_updates == 0:
            return {}
        return {"ref/lora_error": self.error_bound.relative()}

    def state_dict(self) -> dict:
        return {} if self.error_bound is None else {"error_bound": self.error_bound.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.error_bound is not None and "error_bound" in state:
            self.error_bound.load_state_dict(state["error_bound"])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor().clone() if hasattr(t, "full_tensor") else t.detach().clone()


def _write_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """``target <- full``; under FSDP2 each rank keeps its own slice (rank 0's result is scattered,
    so that every rank's shard comes from one computation)."""
    if hasattr(target, "to_local"):
        from torch.distributed.tensor import distribute_tensor

        target.to_local().copy_(distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=0).to_local())
    else:
        target.copy_(full)


@torch.no_grad()
def merged_weights(state: dict[str, torch.Tensor], role: str, scaling: float) -> dict[str, torch.Tensor]:
    """The weights of ``role`` as a plain model holds them, from a PEFT model's full state dict:
    ``W + s·B·A`` per adapted layer (summed in float64, stored in the base's dtype), names without
    PEFT's prefixes, no adapter tensors. ``scaling`` is the policy's ``alpha / rank`` (the
    reference adapter uses it too). For exports and exactness checks."""
    adapter = {POLICY: POLICY, REFERENCE: REFERENCE, INITIAL: None}[role]
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_adapter_key(name):
            continue
        value = tensor.detach()
        layer = name.removesuffix(".base_layer.weight")
        if adapter is not None and layer != name and f"{layer}.lora_A.{adapter}.weight" in state:
            B, A = state[f"{layer}.lora_B.{adapter}.weight"], state[f"{layer}.lora_A.{adapter}.weight"]
            value = (value.double() + scaling * (B.double() @ A.double())).to(tensor.dtype)
        merged[_plain_name(name)] = value
    return merged


def _plain_name(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")
