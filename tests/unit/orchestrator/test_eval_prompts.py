"""evaluation.num_prompts larger than the prompts there are: all are judged, and one line says so."""

from __future__ import annotations

import json

from evaluation.config import EvaluationConfig
from orchestrator.evaluate.prompts import eval_prompts


def config(prompts_path, num_prompts: int) -> EvaluationConfig:
    return EvaluationConfig.model_validate({
        "policies": [{"name": "p", "path": "/nonexistent/p"}], "baseline": {"name": "b", "path": "/nonexistent/b"},
        "prompts_path": str(prompts_path), "num_prompts": num_prompts,
        "judge": {"backend": "openai", "model": "gpt-judge", "base_url": "http://127.0.0.1:9/v1"},
    })


def test_fewer_prompts_than_num_prompts_says_how_many_are_judged(tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(3)))
    assert [i for i, _ in eval_prompts(config(path, 64), None)] == ["q0", "q1", "q2"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"[eval] evaluation.num_prompts is 64 but {path} has 3 prompts: judging all 3"]

    assert len(eval_prompts(config(path, 2), None)) == 2 and capsys.readouterr().err == ""  # as many as asked: silent
    assert len(eval_prompts(config(path, 3), None)) == 3 and capsys.readouterr().err == ""
