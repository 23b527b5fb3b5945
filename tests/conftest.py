"""Shared fixtures: tiny experiment configs that train in seconds on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray Train's controller polls workers every ~2 s by default; tests want quick reports.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: the embedded demo shrunk to seconds, tracking into this test's tmp dir."""
    from orchestrator.config import load_experiment

    def make(*overrides: str):
        base = [
            "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_heads=2",
            "data.synthetic.num_pairs=160", "data.validation_fraction=0.1", "data.max_length=64",
            "training.per_device_batch_size=4", "training.max_steps=12", "training.tau=4",
            "training.eval_every=6", "training.checkpoint_every=6", "training.warmup_steps=0", "training.log_every=1",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.output_dir={tmp_path}/runs",
            "tracking.experiment_name=tests",
        ]
        return load_experiment(None, base + list(overrides))

    return make


@pytest.fixture(scope="module")
def ray_2_cpus():
    """A local Ray with exactly 2 CPUs for the tests of one module, shut down after."""
    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
