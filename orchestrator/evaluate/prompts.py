"""The prompts an evaluation samples on: a JSONL file, or the held-out split of an experiment."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from evaluation.config import EvaluationConfig
from orchestrator.config import ConfigError, ExperimentConfig
from orchestrator.consumers import missing_validation


def eval_prompts(cfg: EvaluationConfig, experiment: ExperimentConfig | None) -> list[tuple[str, str]]:
    """``(prompt_id, text)`` for the first ``num_prompts`` prompts of the file or held-out split."""
    if cfg.prompts_path:
        return _first(_prompts_file(cfg.prompts_path), cfg.num_prompts, cfg.prompts_path)
    if experiment is None:
        raise ConfigError("evaluation", ["prompts: set evaluation.prompts_path or name an experiment for its held-out split"])
    why = missing_validation(experiment.data)
    if why:
        raise ConfigError("evaluation", [f"prompts: evaluation.prompts_path is not set and the experiment has no held-out "
                                         f"split to take them from: {why}"])
    from trainers.data.loading import load_examples, render
    from trainers.model.build import build_tokenizer

    examples, _ = load_examples(experiment.data, "validation")
    tokenizer = build_tokenizer(experiment.model, experiment.tokenizer)
    prompts, seen = [], set()
    for example in examples:
        text = render(tokenizer, example.prompt, example.chosen)[0]
        if text not in seen:  # held-out pairs often share prompts; judge each once per sample
            seen.add(text)
            prompts.append((f"row{example.row}", text))
    if not prompts:
        raise ConfigError("evaluation", ["prompts: the experiment's held-out split has no usable rows"])
    return _first(prompts, cfg.num_prompts, "the experiment's held-out split")


def _first(prompts: list[tuple[str, str]], wanted: int, source: str) -> list[tuple[str, str]]:
    """The first ``wanted`` prompts; when there are fewer, all of them, and one line saying so
    (a smaller evaluation than configured is never silent)."""
    if len(prompts) < wanted:
        print(f"[eval] evaluation.num_prompts is {wanted} but {source} has {len(prompts)} prompts: "
              f"judging all {len(prompts)}", file=sys.stderr, flush=True)
    return prompts[:wanted]


def _prompts_file(path: str) -> list[tuple[str, str]]:
    """``(id, prompt)`` of a JSONL file of ``{"prompt": ..., "id": ...}`` rows; errors name the line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(path, ["evaluation.prompts_path: no such file"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"evaluation.prompts_path: not UTF-8 text (byte {exc.start})"]) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(path, [f"line {number}: not a JSON object ({exc})"]) from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ConfigError(path, [f"line {number}: needs a string 'prompt'"])
        prompts.append((str(row.get("id", len(prompts) + 1)), row["prompt"]))
    if not prompts:
        raise ConfigError(path, ["evaluation.prompts_path: no prompts in the file"])
    return prompts

