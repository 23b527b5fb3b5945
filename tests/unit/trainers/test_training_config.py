"""The trainers' config sections: rules that resolve one field from another."""

from __future__ import annotations

import pickle

import pytest

from orchestrator.config import field_help
from trainers.config import TrainingConfig


def training(**fields) -> TrainingConfig:
    return TrainingConfig(max_steps=4, **fields)


@pytest.mark.parametrize(
    "loss, setting, resolved",
    [
        ("ipo", None, True),  # IPO averages per token by default, as TRL does
        ("sigmoid", None, False),  # DPO sums, as TRL does
        ("ipo", False, False),  # an explicit choice wins in both directions
        ("sigmoid", True, True),
    ],
)
def test_average_log_prob_follows_the_loss_unless_set(loss, setting, resolved):
    cfg = training(loss=loss, **({} if setting is None else {"average_log_prob": setting}))
    assert cfg.average_log_prob is resolved  # what the loop reads: a plain bool
    assert cfg.model_dump()["average_log_prob"] is setting  # what dumps carry: the user's setting


def test_a_dumped_default_follows_a_later_loss_change():
    # Pipeline variants and sweep trials dump the base config, set fields and re-validate: a
    # variant that switches to IPO must average, not inherit the sigmoid default as a choice.
    base = training()
    assert TrainingConfig.model_validate({**base.model_dump(), "loss": "ipo"}).average_log_prob is True
    chosen = training(average_log_prob=False)
    assert TrainingConfig.model_validate({**chosen.model_dump(), "loss": "ipo"}).average_log_prob is False
    # Assignments re-resolve too, and survive pickling (configs travel to Ray workers).
    base.loss = "ipo"
    assert base.average_log_prob is True
    base.average_log_prob = False
    base.loss = "sigmoid"
    base.loss = "ipo"
    assert base.average_log_prob is False
    base.average_log_prob = None
    assert base.average_log_prob is True
    with pytest.raises(ValueError):
        base.average_log_prob = "sometimes"
    assert base.average_log_prob is True and base.model_dump()["average_log_prob"] is None
    copy = pickle.loads(pickle.dumps(training(loss="ipo", average_log_prob=False)))
    copy.loss = "sigmoid"
    assert copy.average_log_prob is False


def test_fields_says_the_ipo_default():
    help_text = next(f for f in field_help() if f.path == "training.average_log_prob")
    assert help_text.default is None and "'ipo'" in help_text.description and "explicit" in help_text.description
