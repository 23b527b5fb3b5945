"""`trdpo eval`'s driver: what it checks about the judge before it spends anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.config import EvaluationConfig
from evaluation.judges import JudgeSettingError
from orchestrator.config import ConfigError, TrackingConfig, load_experiment
from orchestrator.evaluate.driver import run_evaluation
from orchestrator.evaluate.preflight import check_judge
from orchestrator.evaluate.prompts import eval_prompts
from mlflow_store import sqlite_store


def eval_config(**judge) -> EvaluationConfig:
    return EvaluationConfig.model_validate({
        "policies": [{"name": "p", "path": "/nonexistent/p"}], "baseline": {"name": "b", "path": "/nonexistent/b"},
        "criteria": ["helpfulness"],
        "judge": {"backend": "openai", "model": "gpt-judge", "base_url": "http://127.0.0.1:9/v1", **judge},
    })


@pytest.fixture
def nothing_may_start(monkeypatch):
    """Starting Ray or generating a sample means the check came too late."""
    import ray

    import orchestrator.evaluate.driver as evaluate

    def too_late(*args, **kwargs):
        raise AssertionError("the judge was checked only after starting Ray / generating samples")

    monkeypatch.setattr(ray, "init", too_late)
    monkeypatch.setattr(evaluate, "GenerationPool", too_late)


def test_a_missing_judge_key_is_found_before_any_sample(monkeypatch, tmp_path, nothing_may_start):
    monkeypatch.delenv("TRDPO_TEST_UNSET_KEY", raising=False)
    cfg = eval_config(api_key_env="TRDPO_TEST_UNSET_KEY")
    with pytest.raises(JudgeSettingError, match="evaluation.judge.api_key_env: environment variable TRDPO_TEST_UNSET_KEY is not set"):
        run_evaluation(cfg, TrackingConfig(output_dir=str(tmp_path)), "e", [("1", "q")])


def test_an_unknown_template_is_found_before_any_sample(monkeypatch, tmp_path, nothing_may_start):
    monkeypatch.setenv("TRDPO_TEST_KEY", "sk-x")
    cfg = eval_config(api_key_env="TRDPO_TEST_KEY", template="hhh")
    with pytest.raises(JudgeSettingError, match=r"evaluation.judge.template: no template 'hhh' .*\(shipped: coherence, .*hh, .*tldr\)"):
        run_evaluation(cfg, TrackingConfig(output_dir=str(tmp_path)), "e", [("1", "q")])
    cfg.judge.template = "tldr"
    check_judge(cfg)  # all set: no error


def test_a_python_scorer_that_does_not_import_is_found_early():
    cfg = EvaluationConfig.model_validate({"judge": {"backend": "python", "function": "no_such_module:f"}})
    with pytest.raises(JudgeSettingError, match="evaluation.judge.function: cannot import 'no_such_module:f'"):
        check_judge(cfg)


@pytest.fixture(scope="module")
def mlflow_client(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    return MlflowClient(sqlite_store(tmp_path_factory.mktemp("mlflow") / "mlflow.db"))  # one store for the module's runs


def _compare_with(monkeypatch, client, tmp_path, outcomes: list[tuple[str, int]], **judge):
    """Run the driver's per-comparison step on canned judge results (no Ray): ``outcomes`` holds
    (outcome, policy length in words) per item; baselines are 5 words long."""
    import uuid

    import orchestrator.evaluate.comparison as evaluate
    from evaluation.generation import Sample
    from evaluation.protocol import ItemResult

    policy = [Sample(str(i), 0, "q", " ".join(["w"] * n), n, 1.0) for i, (_, n) in enumerate(outcomes)]
    baseline = [Sample(str(i), 0, "q", "b b b b b", 5, 1.0) for i in range(len(outcomes))]
    canned = [ItemResult(f"{i}#0", o, False, ["error" if o == "api_error" else "A"] * 2,
                         ["HTTP 401"] * 2 if o == "api_error" else [], 2, 0, 0.1, 0, n, 5) for i, (o, n) in enumerate(outcomes)]

    class CannedJudges:  # stands in for the judge actor pool
        def judge(self, items, cfg, **kwargs):
            return canned, 2 * len(canned)

    cfg = eval_config(**judge)
    cfg.criteria, cfg.bootstrap_resamples = [], 200
    experiment_id = client.create_experiment(uuid.uuid4().hex)
    parent = client.create_run(experiment_id)
    return evaluate.compare(cfg.policies[0], cfg, [], policy, baseline, [cfg.judge.template], CannedJudges(),
                            client, experiment_id, parent.info.run_id, tmp_path)


def test_lc_win_rate_has_a_ci_and_separation_by_length_is_warned(monkeypatch, mlflow_client, tmp_path, capsys):
    mixed = [("win", 9), ("loss", 8), ("win", 4), ("tie", 6), ("loss", 3), ("win", 7)] * 3
    summary = _compare_with(monkeypatch, mlflow_client, tmp_path, mixed)
    m = summary.metrics
    assert m["eval/lc_separated"] == 0.0 and m["eval/lc_win_rate_ci_low"] < m["eval/lc_win_rate"] < m["eval/lc_win_rate_ci_high"]
    assert "warning" not in capsys.readouterr().err
    # Every win longer than every loss: the logistic fit diverges, and the driver says so.
    separated = [("win", 9), ("win", 8), ("loss", 3), ("loss", 4), ("win", 7)] * 3
    summary = _compare_with(monkeypatch, mlflow_client, tmp_path / "2", separated)
    assert summary.metrics["eval/lc_separated"] == 1.0
    assert (summary.metrics["eval/lc_win_rate_ci_low"], summary.metrics["eval/lc_win_rate_ci_high"]) == (0.0, 1.0)
    err = capsys.readouterr().err
    assert "[eval] warning: p vs b: wins separate (or nearly separate) by response length" in err


def test_no_successful_judgment_is_an_error_naming_the_judge(monkeypatch, mlflow_client, tmp_path):
    from evaluation.judges import JudgeUnavailable

    monkeypatch.setenv("TRDPO_TEST_KEY", "sk-x")
    with pytest.raises(JudgeUnavailable) as info:
        _compare_with(monkeypatch, mlflow_client, tmp_path, [("api_error", 5), ("parse_failure", 6)], api_key_env="TRDPO_TEST_KEY")
    assert isinstance(info.value, ValueError)  # so the CLI prints one line and exits non-zero
    assert str(info.value) == ("openai judge 'gpt-judge' at http://127.0.0.1:9/v1: no judgment succeeded for p vs b [hh] "
                               "(1 API errors, 1 parse failures of 2; first error: HTTP 401)")
    assert "sk-x" not in str(info.value)
    # One success is enough to report (the failures are counted in the metrics).
    summary = _compare_with(monkeypatch, mlflow_client, tmp_path / "2", [("api_error", 5), ("win", 6)])
    assert summary.metrics["eval/api_errors"] == 1 and summary.metrics["eval/win_rate"] == 1.0


def test_policy_paths_that_are_not_models_are_found_before_any_sample(monkeypatch, tmp_path, nothing_may_start):
    monkeypatch.setenv("TRDPO_TEST_KEY", "sk-x")
    cfg = eval_config(api_key_env="TRDPO_TEST_KEY")
    with pytest.raises(ConfigError, match=r"evaluation.policies\[0\].path: '/nonexistent/p' is not a model directory"):
        run_evaluation(cfg, TrackingConfig(output_dir=str(tmp_path)), "e", [("1", "q")])


@pytest.mark.parametrize("content, problem", [
    (None, "evaluation.prompts_path: no such file"),
    ('{"prompt": "a"}\n\n{"prompt": "b"\n', "line 3: not a JSON object (Expecting ',' delimiter: line 1 column 15 (char 14))"),
    ('{"prompt": "a"}\n{"text": "b"}\n', "line 2: needs a string 'prompt'"),
    ("\n", "evaluation.prompts_path: no prompts in the file"),
], ids=["missing", "bad-json", "no-prompt", "empty"])
def test_a_bad_prompts_file_is_one_error_naming_the_line(tmp_path, content, problem):
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    cfg = EvaluationConfig.model_validate({"prompts_path": str(path)})
    with pytest.raises(ConfigError) as raised:
        eval_prompts(cfg, None)
    assert raised.value.problems == [problem]


def test_held_out_prompts_need_a_held_out_split():
    experiment = load_experiment(None, ["data.validation_fraction=0"])
    with pytest.raises(ConfigError) as raised:
        eval_prompts(EvaluationConfig(), experiment)
    assert raised.value.problems == ["prompts: evaluation.prompts_path is not set and the experiment has no held-out split to "
                                     "take them from: data.validation_fraction is 0 and no data.validation_path/validation_split is set"]


def test_a_study_that_would_judge_held_out_prompts_without_any_is_refused_before_anything(tmp_path, nothing_may_start):
    from orchestrator.pipeline import run_pipeline

    config = load_experiment(None, ["data.validation_fraction=0", f"tracking.output_dir={tmp_path}/runs",
                                    f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    with pytest.raises(ConfigError) as raised:
        run_pipeline(config, use_ray=False)
    assert raised.value.problems == ["evaluation.prompts_path: not set, so the study would judge the prompts of the held-out split, "
                                     "but data.validation_fraction is 0 and no data.validation_path/validation_split is set; set "
                                     "evaluation.prompts_path or give the data a validation split"]
    assert list(tmp_path.iterdir()) == []  # no store, no run, no checkpoint


def test_an_eval_files_inputs_resolve_like_an_experiment_files(tmp_path, monkeypatch):
    """Beside the eval file first, then the working directory (the experiment file's rule); a
    prompts file found in neither place is named beside the eval file."""
    from orchestrator.evaluate.file import load_eval_file

    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "beside.jsonl").write_text('{"prompt": "q"}\n')
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "q"}\n')
    (tmp_path / "policy").mkdir()
    eval_file = tmp_path / "evals" / "eval.yaml"
    monkeypatch.chdir(tmp_path)

    def loaded(prompts: str):
        eval_file.write_text(f"evaluation:\n  prompts_path: {prompts}\n  policies: [{{name: p, path: policy}}]\n"
                             f"  baseline: {{name: b, path: EleutherAI/pythia-70m}}\n")
        return load_eval_file(eval_file)[0].evaluation

    cfg = loaded("prompts.jsonl")
    assert cfg.prompts_path == str(tmp_path / "prompts.jsonl")  # the working directory's
    assert cfg.policies[0].path == str(tmp_path / "policy") and cfg.baseline.path == "EleutherAI/pythia-70m"
    assert loaded("beside.jsonl").prompts_path == str(tmp_path / "evals" / "beside.jsonl")
    assert loaded("missing.jsonl").prompts_path == str(tmp_path / "evals" / "missing.jsonl")


def test_an_answer_with_no_verdict_is_kept_in_the_per_example_table(monkeypatch, mlflow_client, tmp_path):
    import orchestrator.evaluate.comparison as evaluate
    from evaluation.generation import Sample
    from evaluation.protocol import ItemResult

    answer = "Both have merits; I cannot say."
    policy = [Sample(str(i), 0, "q", "w w w", 3, 1.0) for i in range(2)]
    baseline = [Sample(str(i), 0, "q", "b b b b b", 5, 1.0) for i in range(2)]
    canned = [ItemResult("0#0", "win", False, ["A", "B"], [], 2, 0, 0.1, 0, 3, 5),
              ItemResult("1#0", "parse_failure", False, ["A", None], [], 2, 0, 0.1, 0, 3, 5, unparsed_answers=[answer])]

    class CannedJudges:  # stands in for the judge actor pool
        def judge(self, items, cfg, **kwargs):
            return canned, 4

    cfg = eval_config()
    cfg.criteria, cfg.bootstrap_resamples = [], 200
    experiment_id = mlflow_client.create_experiment("unparsed-answers")
    parent = mlflow_client.create_run(experiment_id)
    summary = evaluate.compare(cfg.policies[0], cfg, [], policy, baseline, [cfg.judge.template], CannedJudges(),
                               mlflow_client, experiment_id, parent.info.run_id, tmp_path)
    table = json.loads(Path(mlflow_client.download_artifacts(summary.run_id, "examples.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    column = f"{cfg.judge.template}_unparsed_answers"
    assert {row["item_id"]: json.loads(row[column]) for row in rows} == {"0#0": [], "1#0": [answer]}
