"""Dropout is off in every model of the objective unless ``model.keep_dropout`` (TRL's default).

With dropout off, the policy and the reference are the same function at step 1, so the DPO loss
of every pair is -log sigmoid(0) = ln 2 and both rewards are beta x 0 = 0, exactly (the two
forwards run the same ops on the same weights). With GPT-2's dropout of 0.1 kept, the policy's
train-mode forward drops activations the reference's eval-mode forward keeps: the loss moves off
ln 2 and the rewards are noise.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

from trainers import loop
from trainers.config import DataConfig, ModelConfig, SyntheticDataConfig, TokenizerConfig, TrainingConfig
from trainers.state.fingerprint import differences, fingerprint
from trainers.fsdp_check import FAMILIES, save_tiny_family, tiny_family_config
from trainers.model.build import disable_dropout
from trainers.sessions import LocalSession
from trainers.state.storage import Storage

pytestmark = pytest.mark.exactness

LN2_FP32 = float(torch.tensor(math.log(2.0)))  # the losses are fp32


def with_dropout(config, p: float = 0.1):
    """``config`` with every dropout probability it has set to ``p``."""
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, p)
    return config


@pytest.mark.parametrize("family", FAMILIES)
def test_a_train_mode_forward_equals_eval_mode_once_dropout_is_disabled(family):
    """Module dropout (GPT-2) and the float probabilities attention layers keep (Llama, Qwen2,
    Mistral, GPT-NeoX) are both switched off."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(with_dropout(tiny_family_config(family)))
    ids = torch.randint(3, 290, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        assert not torch.equal(model.train()(input_ids=ids).logits, expected)  # the dropout is real
        assert disable_dropout(model) > 0
        assert torch.equal(model.train()(input_ids=ids).logits, expected)
        assert disable_dropout(model) == 0  # nothing left on


@pytest.fixture(scope="module")
def gpt2_with_dropout(tmp_path_factory):
    """A tiny random GPT-2 with resid/embd/attn dropout 0.1 and its byte tokenizer, saved locally."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainers.model.build import make_byte_tokenizer

    path = tmp_path_factory.mktemp("gpt2-dropout")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(with_dropout(tiny_family_config("gpt2"))).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    assert AutoConfig.from_pretrained(path).resid_pdrop == 0.1
    return path


def step_one_metrics(model_dir, keep_dropout: bool) -> dict:
    """Train one step of DPO on the synthetic task in this process; the step's logged metrics."""
    model = ModelConfig(name_or_path=str(model_dir), keep_dropout=keep_dropout)
    tokenizer = TokenizerConfig(name_or_path=str(model_dir))
    data = DataConfig(format="synthetic", synthetic=SyntheticDataConfig(num_pairs=40), max_length=64,
                      max_prompt_length=32, validation_fraction=0.1)
    training = TrainingConfig(max_steps=1, per_device_batch_size=8, precision="fp32", seed=0, learning_rate=1e-4)
    logged = []
    with tempfile.TemporaryDirectory(prefix="trdpo-test-dropout-") as out:
        spec = loop.TrainSpec(model, tokenizer, data, training, out, step_logger=logged.append)
        loop.train(spec, LocalSession(lambda metrics, saved: None, Storage(out).child(loop.CHECKPOINTS), keep=1))
    return logged[0]


def test_step_one_loss_is_ln2_and_rewards_are_zero_with_gpt2_dropout_off(gpt2_with_dropout):
    metrics = step_one_metrics(gpt2_with_dropout, keep_dropout=False)
    assert metrics["train/loss"] == LN2_FP32
    assert metrics["train/rewards/chosen"] == 0.0 and metrics["train/rewards/rejected"] == 0.0
    assert metrics["train/rewards/margins"] == 0.0


def test_keeping_gpt2_dropout_moves_the_step_one_loss_off_ln2(gpt2_with_dropout):
    metrics = step_one_metrics(gpt2_with_dropout, keep_dropout=True)
    assert abs(metrics["train/loss"] - LN2_FP32) > 1e-4
    assert metrics["train/rewards/chosen"] != 0.0 and metrics["train/rewards/rejected"] != 0.0


# ------------------------------------------------------------------------------- fingerprints


def run_fingerprint(model: ModelConfig) -> dict:
    data = DataConfig(format="synthetic")
    return fingerprint(model, TokenizerConfig(kind="byte") if model.tiny else TokenizerConfig(), data,
                       TrainingConfig(max_steps=10))


def written_before_the_field(current: dict) -> dict:
    """The fingerprint the same config had before ``model.keep_dropout`` existed."""
    return {k: v for k, v in current.items() if k != "model.keep_dropout"}


def test_runs_written_before_keep_dropout_existed_resume_where_dropout_changes_nothing(tmp_path):
    from trainers.config import TinyModelConfig

    tiny = ModelConfig(tiny=TinyModelConfig())  # the demo's Llama: attention_dropout 0
    save_tiny_family("gpt_neox", tmp_path / "neox")  # dropout 0 in its config.json
    for model in (tiny, ModelConfig(name_or_path=str(tmp_path / "neox"))):
        for keep in (False, True):
            current = run_fingerprint(model.model_copy(update={"keep_dropout": keep}))
            assert current == written_before_the_field(current), (model, keep)


def test_a_run_that_trained_with_dropout_resumes_only_with_keep_dropout(gpt2_with_dropout):
    kept = run_fingerprint(ModelConfig(name_or_path=str(gpt2_with_dropout), keep_dropout=True))
    old = written_before_the_field(kept)  # those runs kept the model's dropout
    assert kept == old
    default = run_fingerprint(ModelConfig(name_or_path=str(gpt2_with_dropout)))
    assert default != old
    (line,) = differences(old, default)
    assert line.startswith("model.keep_dropout (True -> False")
    assert "set model.keep_dropout: true to continue it" in line
    hub = run_fingerprint(ModelConfig(name_or_path="EleutherAI/pythia-70m"))  # not local: assumed to have dropout
    assert hub["model.keep_dropout"] is False
