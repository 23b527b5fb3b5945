"""The evaluation file (``trdpo eval FILE``): its schema, how it is recognised, and its loading."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError

from evaluation.config import EvaluationConfig
from orchestrator.config import (ConfigError, ExperimentConfig, TrackingConfig, load_experiment, read_yaml,
                                 resolve_input_path)
from trainers.config import Section


class EvalFile(Section):
    """An evaluation file: what to compare, on which prompts, judged how, tracked where."""

    name: str = Field("eval", description="Name of the evaluation (MLflow parent run).")
    experiment: str | None = Field(None, description="Experiment file whose held-out split gives the prompts (relative to this file).")
    evaluation: EvaluationConfig = Field(description="Policies, baseline, prompts, sampling and judge.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow and output locations.")


def is_eval_file(path: str | Path) -> bool:
    """Evaluation files have an ``evaluation`` section and no ``training`` section."""
    try:
        tree = read_yaml(path)
    except ConfigError:
        return False
    return isinstance(tree, dict) and "evaluation" in tree and "training" not in tree


def load_eval_file(path: str | Path) -> tuple[EvalFile, ExperimentConfig | None]:
    path = Path(path)
    tree = read_yaml(path)
    try:
        config = EvalFile.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(str(path), [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    experiment = load_experiment(path.parent / config.experiment) if config.experiment else None
    # The same resolution as an experiment file's inputs: beside the eval file, then the working directory.
    if config.evaluation.prompts_path:
        config.evaluation.prompts_path = resolve_input_path(config.evaluation.prompts_path, path.parent, is_file=True)
    for ref in [*config.evaluation.policies, *([config.evaluation.baseline] if config.evaluation.baseline else [])]:
        if ref.path:
            ref.path = resolve_input_path(ref.path, path.parent)
    if not config.evaluation.policies or config.evaluation.baseline is None:
        raise ConfigError(str(path), ["evaluation.policies / evaluation.baseline: an eval file needs both"])
    return config, experiment

