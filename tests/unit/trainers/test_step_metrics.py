"""Throughput is the work of every step in the logging window over the window's time.

The loop runs in this process on the demo's tiny Llama; the clock is replaced by one that reads
the number of optimizer steps done, so each step takes exactly one second of it."""

from __future__ import annotations

import pytest

from trainers import loop, step_metrics
from trainers.config import (DataConfig, ModelConfig, SyntheticDataConfig, TinyModelConfig, TokenizerConfig,
                             TrainingConfig)
from trainers.sessions import LocalSession
from trainers.state.storage import Storage

PAIRS_PER_STEP = 4


def logged_metrics(tmp_path, monkeypatch, log_every: int) -> list[dict]:
    steps_done = [0]

    def count_step(run_uri: str, step: int, rank: int) -> None:
        steps_done[0] = step

    monkeypatch.setattr(step_metrics, "clock", lambda: float(steps_done[0]))
    data = DataConfig(format="synthetic", synthetic=SyntheticDataConfig(num_pairs=40), max_length=64,
                      max_prompt_length=32, validation_fraction=0.1)
    training = TrainingConfig(max_steps=6, per_device_batch_size=PAIRS_PER_STEP, precision="fp32", seed=0,
                              log_every=log_every, eval_every=100, checkpoint_every=100)
    logged: list[dict] = []
    out = tmp_path / f"log-every-{log_every}"
    spec = loop.TrainSpec(ModelConfig(tiny=TinyModelConfig()), TokenizerConfig(kind="byte"), data, training, str(out),
                          step_logger=logged.append, after_step=count_step)
    loop.train(spec, LocalSession(lambda metrics, saved: None, Storage(str(out)).child(loop.CHECKPOINTS), keep=1))
    return logged


def test_throughput_counts_every_step_of_a_logging_window(tmp_path, monkeypatch):
    every_step = logged_metrics(tmp_path, monkeypatch, log_every=1)
    assert [m["step"] for m in every_step] == [1, 2, 3, 4, 5, 6]
    # One step per second of the fake clock: each step's rate is its own work.
    assert all(m["train/pairs_per_s"] == PAIRS_PER_STEP for m in every_step)
    tokens_of_step = {m["step"]: m["train/tokens_per_s"] for m in every_step}

    windows = logged_metrics(tmp_path, monkeypatch, log_every=3)
    assert [m["step"] for m in windows] == [3, 6]
    for m, window_steps in zip(windows, ([1, 2, 3], [4, 5, 6])):
        seconds = len(window_steps)
        assert m["train/pairs_per_s"] == pytest.approx(PAIRS_PER_STEP * len(window_steps) / seconds)
        assert m["train/tokens_per_s"] == pytest.approx(sum(tokens_of_step[s] for s in window_steps) / seconds)
    assert len(set(tokens_of_step.values())) > 1  # the steps differ, so the window's sum is a real check
