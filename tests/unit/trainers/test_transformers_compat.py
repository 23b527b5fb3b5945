"""The transformers differences trainers.compat absorbs, across the versions pyproject.toml allows."""

from __future__ import annotations

import importlib

import pytest
import torch

from trainers.compat import dtype_argument, transformers_version
from trainers.config import ModelConfig
from trainers.fsdp_check import save_tiny_family
from trainers.model.build import load_pretrained, model_skeleton


pytestmark = pytest.mark.exactness


@pytest.mark.parametrize("version, keyword", [("4.54.1", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                              ("4.56.0", "dtype"), ("5.24.0", "dtype"), ("6.0.0.dev0", "dtype")])
def test_the_dtype_keyword_follows_the_version(monkeypatch, version, keyword):
    # The module in sys.modules now: transformers 4.54 replaces its own entry after some loads.
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", version)
    assert dtype_argument(torch.bfloat16) == {keyword: torch.bfloat16}


def test_skeleton_and_load_take_the_dtype_on_the_installed_version(tmp_path):
    """What crashed export and loading before 4.56 (an unknown ``dtype=`` reached the model's __init__)."""
    path = save_tiny_family("gpt2", tmp_path / "gpt2")
    model_cfg = ModelConfig(name_or_path=str(path))
    skeleton = model_skeleton(model_cfg, None)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert {p.dtype for p in skeleton.parameters()} == {torch.float32}
    loaded = load_pretrained(str(path), "model.name_or_path", model_cfg, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert transformers_version() >= (4, 54)  # pyproject.toml's lower bound
