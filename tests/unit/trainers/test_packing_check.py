"""The start-up check of packed scoring (trainers.model.scoring.check_packing): on a tiny random instance
of the loaded model's config, two sequences packed into one row must score as each alone.

transformers before the lower bound in pyproject.toml built no block-diagonal mask from
``position_ids`` for some families (GPT-2 until 4.55), and packed log-probs were silently off. Here
the packed path is broken on purpose (the row's ``position_ids`` withheld, as an install that
ignores them would do: positions run on and attention crosses the boundary), and the check must
catch it: packing off with one line, or an error when the user asked for packing.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainers.data.batching import TokenBatch
from trainers.config import TrainingConfig
from trainers.fsdp_check import FAMILIES, tiny_family_config
from trainers.model.scoring import PackingNotExact, packing_error, resolve_fast_paths, tiny_instance


pytestmark = pytest.mark.exactness


def model_of(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_family_config(family))


@pytest.fixture
def packing_ignored(monkeypatch):
    """Packed rows reach the model without their position_ids."""
    plain = TokenBatch.model_inputs

    def without_positions(self):
        inputs = plain(self)
        inputs.pop("position_ids", None)
        return inputs

    monkeypatch.setattr(TokenBatch, "model_inputs", without_positions)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_scoring_is_exact_on_a_tiny_instance_of_every_verified_family(family):
    assert packing_error(tiny_family_config(family), torch.device("cpu")) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tiny_instance_keeps_the_family_and_attention_but_is_small(family):
    config = tiny_family_config(family)
    config._attn_implementation = "eager"
    tiny = tiny_instance(config)
    assert type(tiny) is type(model_of(family))
    assert tiny.config._attn_implementation == "eager"
    assert tiny.config.num_hidden_layers == 2 and tiny.config.hidden_size == 32


def test_a_wrong_packed_path_turns_packing_off_with_one_line(packing_ignored):
    model = model_of("gpt2")  # learned absolute positions: positions that do not restart change every score
    assert packing_error(model.config, torch.device("cpu")) > 1e-2
    cfg, notes = resolve_fast_paths(model, TrainingConfig(max_steps=10))
    assert cfg.packing is False and cfg.logprob_chunk_tokens == 1024
    (line,) = notes
    assert line.startswith("training.packing: packed sequences of a 'gpt2' model") and line.endswith("; using padding")
    assert "transformers " in line and "\n" not in line


def test_a_wrong_packed_path_refuses_packing_the_user_asked_for(packing_ignored):
    with pytest.raises(PackingNotExact, match=r"^training\.packing: packed sequences of a 'llama' model .* set "
                                              r"training\.packing: false"):
        resolve_fast_paths(model_of("llama"), TrainingConfig(max_steps=10, packing=True))


def test_padding_asked_for_runs_no_check(packing_ignored):
    cfg = TrainingConfig(max_steps=10, packing=False)
    assert resolve_fast_paths(model_of("llama"), cfg) == (cfg, [])


def test_the_check_leaves_the_global_random_state_alone():
    state = torch.random.get_rng_state()
    packing_error(tiny_family_config("llama"), torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)
