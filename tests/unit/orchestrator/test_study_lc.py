"""The study's length-controlled win rate pools the examples of every seed; its CI draws prompts."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import length_controlled
from orchestrator.study.collect import _lengths


def example_rows(samples: int) -> list[dict]:
    """examples.json rows: ``samples`` identical samples of each of 40 prompts."""
    rng = np.random.default_rng(5)
    rows = []
    for prompt in range(40):
        outcome, words = str(rng.choice(["win", "loss", "tie"], p=[0.5, 0.35, 0.15])), int(rng.integers(5, 40))
        rows += [{"item_id": f"p{prompt}#{k}", "policy": "w " * words, "baseline": "b " * 20, "hh_outcome": outcome}
                 for k in range(samples)]
    return rows


def test_study_lc_ci_draws_prompts_not_samples():
    one = length_controlled(_lengths(example_rows(1), "hh"), resamples=300, seed=0)
    four = length_controlled(_lengths(example_rows(4), "hh"), resamples=300, seed=0)
    assert not one.separated and not four.separated
    assert (four.ci_low, four.ci_high) == pytest.approx((one.ci_low, one.ci_high), abs=1e-9)
