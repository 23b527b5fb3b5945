"""A run written before a field existed resumes when the field's value reproduces what it did."""

from __future__ import annotations

import pytest

from trainers.config import DataConfig, ModelConfig, TinyModelConfig, TokenizerConfig, TrainingConfig
from trainers.state import fingerprint as fingerprints

NEW_FIELD = "training.label_smoothing"  # stands for a field added after the old run: 0.0 is what runs did before it


def run_fingerprint(**training) -> dict:
    return fingerprints.fingerprint(ModelConfig(tiny=TinyModelConfig()), TokenizerConfig(kind="byte"),
                                    DataConfig(format="synthetic"), TrainingConfig(max_steps=4, **training))


@pytest.fixture
def old_run(monkeypatch) -> dict:
    """The fingerprint a run wrote before NEW_FIELD existed: every other field, NEW_FIELD absent."""
    monkeypatch.setattr(fingerprints, "FIELDS_ADDED_LATER",
                        {**getattr(fingerprints, "FIELDS_ADDED_LATER", {}), NEW_FIELD: 0.0}, raising=False)
    written = run_fingerprint(label_smoothing=0.0)
    written.pop(NEW_FIELD, None)
    return written


def test_an_old_run_resumes_when_the_new_fields_value_reproduces_its_behaviour(old_run):
    assert fingerprints.differences(old_run, run_fingerprint()) == []


def test_an_old_run_is_a_changed_run_when_the_new_field_changes_behaviour(old_run):
    assert fingerprints.differences(old_run, run_fingerprint(label_smoothing=0.2)) == [
        f"{NEW_FIELD} (0.0 -> 0.2; set {NEW_FIELD}: 0.0 to continue it)"]


def test_a_field_that_existed_all_along_still_compares_by_value():
    assert fingerprints.differences(run_fingerprint(), run_fingerprint(beta=0.2)) == ["training.beta (0.1 -> 0.2)"]
