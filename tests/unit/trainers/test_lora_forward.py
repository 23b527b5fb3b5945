"""The adapted linear layers' forward (trainers.model.lora.fused_lora_forward): PEFT's outputs and
gradients for every role, without PEFT's [tokens, out] temporaries."""

from __future__ import annotations

import math

import pytest
import torch
from test_chunked import LiveBytes  # same directory (pytest puts it on sys.path)
from transformers import AutoModelForCausalLM, GPTNeoXConfig

from trainers.config import LoraConfig
from trainers.model.lora import INITIAL, POLICY, REFERENCE, AdapterRoles, attach_adapters, lora_layers

CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=300,
              rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)


def adapted_model(base_dtype: str = "fp32"):
    """A tiny GPT-NeoX with both adapters, every factor random (the reference's start at zero)."""
    torch.manual_seed(0)
    model = attach_adapters(AutoModelForCausalLM.from_config(GPTNeoXConfig(**CONFIG)), LoraConfig(rank=4, alpha=8, base_dtype=base_dtype),
                            "soft")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.normal_(0, 0.2)
    return model


def run(model, role: str, input_ids: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the policy adapter's gradients of one forward and backward as ``role``."""
    model.zero_grad(set_to_none=True)
    roles = AdapterRoles(model, "soft")
    with roles.active(role), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
    if logits.requires_grad:
        logits.square().mean().backward()
    grads = [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    return logits.detach(), grads


def with_peft_forward(model):
    for layer in lora_layers(model):
        del layer.forward  # the instance's fused forward: PEFT's class method again
    return model


@pytest.mark.parametrize("role", [POLICY, REFERENCE, INITIAL])
def test_every_role_scores_and_differentiates_as_peft_does(role):
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    fused, fused_grads = run(adapted_model(), role, input_ids, bf16=False)
    peft, peft_grads = run(with_peft_forward(adapted_model()), role, input_ids, bf16=False)
    assert torch.allclose(fused, peft, rtol=1e-5, atol=1e-6), (fused - peft).abs().max()
    assert len(fused_grads) == len(peft_grads) == (16 if role == POLICY else 0)  # A and B of 8 layers, policy only
    for mine, theirs in zip(fused_grads, peft_grads):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6 * theirs.abs().max()), (mine - theirs).abs().max()


def relative_error(values: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    return max(float((v - t).abs().max() / t.abs().max()) for v, t in zip(values, truth))


@pytest.mark.parametrize("role", [POLICY, REFERENCE])
def test_a_bf16_base_under_autocast_is_as_close_to_fp32_as_peft(role):
    """bf16 autocast: the delta is summed into the bf16 output in one rounding (PEFT rounds B's output,
    its scaled copy and the sum); both are as far from the same model computed in fp32."""
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    truth, truth_grads = run(with_peft_forward(adapted_model()), role, input_ids, bf16=False)
    fused, fused_grads = run(adapted_model("bf16"), role, input_ids, bf16=True)
    peft, peft_grads = run(with_peft_forward(adapted_model("bf16")), role, input_ids, bf16=True)
    assert all(g.dtype == torch.float32 for g in fused_grads) and len(fused_grads) == len(peft_grads)
    assert relative_error([fused], [truth]) <= 1.5 * relative_error([peft], [truth])
    if role == POLICY:
        assert relative_error(fused_grads, truth_grads) <= 1.5 * relative_error(peft_grads, truth_grads)


def output_sized(layer, x: torch.Tensor) -> tuple[int, torch.Tensor, LiveBytes]:
    """How many tensors of the layer's output width its forward allocates (and its output)."""
    with LiveBytes() as tracked:
        out = layer(x)
    return sum(1 for shape, _ in tracked.allocations if math.prod(shape) == out.numel()), out, tracked


def test_an_adapted_layer_allocates_its_output_once_where_peft_allocates_four_outputs():
    """PEFT's ``result + lora_B(lora_A(x)) * scaling`` allocates the base output, B's output, the
    scaled copy and the sum, each [tokens, out]; fused, the delta goes into the base output."""
    model = adapted_model()
    layer = next(m for name, m in model.named_modules() if name.endswith("dense_h_to_4h"))
    x = torch.randn(2, 512, CONFIG["hidden_size"], requires_grad=True)
    count, out, tracked = output_sized(layer, x)
    assert count == 1
    assert tracked.peak <= out.numel() * 4 + 2 * 512 * 4 * 4  # the output, the rank-4 activations (and x's cast)
    out.square().sum().backward()
    grads = [x.grad] + [layer.lora_A[POLICY].weight.grad, layer.lora_B[POLICY].weight.grad]
    with_peft_forward(model)
    x2 = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    peft_count, peft_out, _ = output_sized(layer, x2)
    assert peft_count == 4
    peft_out.square().sum().backward()
    assert torch.allclose(out, peft_out, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(grads, [x2.grad, layer.lora_A[POLICY].weight.grad, layer.lora_B[POLICY].weight.grad]):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max())
