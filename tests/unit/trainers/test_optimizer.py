"""AdamW parameter groups follow the convention users compare against (Hugging Face Trainer,
TRL): no weight decay on biases and normalisation weights, decay on everything else."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from trainers.config import TrainingConfig
from trainers.fsdp_check import tiny_family_config
from trainers.optimizer import make_optimizer


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_weight_decay_skips_biases_and_norms_as_hugging_face_does(family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_family_config(family))
    optimizer = make_optimizer(model, TrainingConfig(ref_update="none", max_steps=1, weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    exempt = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    # The Trainer's own rule (an instance method that does not use its instance).
    expected = set(Trainer.get_decay_parameter_names(None, model))
    assert decayed == expected & set(names.values())
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    assert any(n.endswith("bias") for n in exempt) or family in ("llama",)  # llama has no biases
    assert any("norm" in n or ".ln_" in n for n in exempt)
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decayed)


def test_weight_decay_of_zero_is_one_group_of_no_decay():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_family_config("llama"))
    optimizer = make_optimizer(model, TrainingConfig(ref_update="none", max_steps=1, weight_decay=0.0))
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
