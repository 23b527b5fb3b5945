"""What is checked before an evaluation spends anything: the models exist, the judge is usable."""

from __future__ import annotations

from pathlib import Path

from evaluation.config import EvaluationConfig
from evaluation.judges import PythonScorer, is_pairwise, load_template, read_api_key
from orchestrator.config import ConfigError
from trainers.state.storage import Storage, is_remote


def check_models(cfg: EvaluationConfig) -> None:
    """Every local policy and baseline path is a model directory: found here, in one line, not
    as a traceback from a generation actor after the other models were sampled."""
    for field, ref in [*((f"evaluation.policies[{i}]", p) for i, p in enumerate(cfg.policies)), ("evaluation.baseline", cfg.baseline)]:
        if ref is None or not ref.path:
            continue
        found = Storage(ref.path).exists("config.json") if is_remote(ref.path) else (Path(ref.path).expanduser() / "config.json").is_file()
        if not found:
            raise ConfigError("evaluation", [f"{field}.path: {ref.path!r} is not a model directory (no config.json)"])



def judge_templates(cfg: EvaluationConfig) -> list[str]:
    """The main template, then one per criterion (``*_score`` when criteria are rated 1-10)."""
    return [cfg.judge.template] + [f"{c}_score" if cfg.criteria_mode == "score" else c for c in cfg.criteria]


def check_judge(cfg: EvaluationConfig) -> None:
    """What can be known about the judge without calling it, checked before any sample is
    generated (sampling can take hours; a missing key should not wait for it): the API key's
    variable is set, the templates exist, a python scorer imports."""
    if cfg.judge.backend == "openai":
        read_api_key(cfg.judge)
    if is_pairwise(cfg.judge):
        for template in judge_templates(cfg):
            load_template(template)
    if cfg.judge.backend == "python":
        PythonScorer(cfg.judge)

