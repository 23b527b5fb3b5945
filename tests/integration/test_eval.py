"""`trdpo eval` end to end on a real local Ray: generation and judge actor pools, a loopback
OpenAI-compatible judge with injected faults, MLflow structure, caching, and no leaked key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from evaluation.config import EvaluationConfig
from loopback_judge import LoopbackJudge
from orchestrator.config import TrackingConfig
from orchestrator.evaluate.driver import run_evaluation
from orchestrator.evaluate.preflight import check_judge
from orchestrator.evaluate.prompts import eval_prompts
from trainers.config import TinyModelConfig
from trainers.model.build import build_tiny_model, make_byte_tokenizer
from mlflow_store import sqlite_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]
SECRET = "sk-eval-SECRET-7f3a9"


def save_model(path: Path, seed: int) -> str:
    tokenizer = make_byte_tokenizer()
    build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_heads=2, seed=seed), len(tokenizer),
                     tokenizer.pad_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_eval_pool_with_faulty_judge(ray_2_cpus, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("EVAL_JUDGE_KEY", SECRET)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": f"Review of the item {i}:"}) + "\n" for i in range(6)))
    # "truncated": 200 replies with half a JSON body; before they were caught, one ended the eval.
    faults = {"429": 0.1, "500": 0.1, "drop": 0.05, "malformed": 0.1, "truncated": 0.05}
    with LoopbackJudge(faults=faults, seed=1, latency_s=0.01) as server:
        cfg = EvaluationConfig.model_validate({
            "policies": [{"name": "alpha", "path": save_model(tmp_path / "a", 1)}, {"name": "beta", "path": save_model(tmp_path / "b", 2)}],
            "baseline": {"name": "sft", "path": save_model(tmp_path / "s", 3)},
            "prompts_path": str(prompts_file), "num_prompts": 6, "criteria": ["helpfulness"],
            "sampling": {"temperature": 1.0, "max_new_tokens": 10, "num_samples": 2, "batch_size": 4, "seed": 5},
            "judge": {"backend": "openai", "model": "loopback", "base_url": server.base_url, "api_key_env": "EVAL_JUDGE_KEY",
                      "template": "hh", "max_retries": 3, "timeout_s": 2.0, "concurrency": 4},
            "num_generation_actors": 2, "num_judge_actors": 2, "cache_path": str(tmp_path / "judgments.sqlite"),
        })
        tracking = TrackingConfig(tracking_uri=sqlite_store(tmp_path / "mlflow.db"), output_dir=str(tmp_path / "out"), experiment_name="evals")
        prompts = eval_prompts(cfg, None)
        summaries = run_evaluation(cfg, tracking, "faulty", prompts, num_cpus_per_actor=0.5)
        first_calls = server.calls
        assert server.fault_counts.get("truncated", 0) > 0
    assert len(summaries) == 2 and first_calls > 0
    client = MlflowClient(tracking.resolved_tracking_uri())
    experiment = client.get_experiment_by_name("evals")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        m = child.data.metrics
        for prefix in ("eval/", "eval/helpfulness/"):
            counted = m[f"{prefix}wins"] + m[f"{prefix}losses"] + m[f"{prefix}ties"] + m[f"{prefix}parse_failures"] + m[f"{prefix}api_errors"]
            assert counted == m[f"{prefix}comparisons"] == 12  # 6 prompts x 2 samples: nothing dropped
        assert 0.0 <= m["eval/win_rate_ci_low"] <= m["eval/win_rate"] <= m["eval/win_rate_ci_high"] <= 1.0
        assert {"diversity/policy/self_bleu", "diversity/policy/distinct_2", "eval/lc_win_rate", "eval/flip_rate",
                "eval/lc_separated"} <= set(m)
        if not m["eval/lc_separated"]:
            assert 0.0 <= m["eval/lc_win_rate_ci_low"] <= m["eval/lc_win_rate"] <= m["eval/lc_win_rate_ci_high"] <= 1.0
        else:
            assert (m["eval/lc_win_rate_ci_low"], m["eval/lc_win_rate_ci_high"]) == (0.0, 1.0)
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"samples.jsonl", "examples.json"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {"plots/win_rates.png", "plots/criteria.png"}

    # Rerun against a clean judge: only judgments that failed for good, or whose answer had no
    # verdict (those are not cached), are asked again.
    failed = sum(int(c.data.metrics[f"{prefix}{kind}"]) for c in children
                 for prefix in ("eval/", "eval/helpfulness/") for kind in ("api_errors", "parse_failures"))
    with LoopbackJudge(seed=2) as clean:
        cfg.judge.base_url = clean.base_url
        again = run_evaluation(cfg, tracking, "rerun", prompts, num_cpus_per_actor=0.5)
        assert clean.calls == sum(s.metrics["eval/judge_calls"] + s.metrics["eval/helpfulness/judge_calls"] for s in again)
        assert clean.calls <= 2 * 2 * failed
    assert all(s.metrics["eval/api_errors"] == 0 for s in again)

    # The key reached the judge server, and nowhere else: not MLflow's database, artifacts, or logs.
    out, err = capfd.readouterr()
    haystack = [(tmp_path / "mlflow.db").read_bytes()]
    haystack += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix in {".json", ".jsonl", ".csv", ".yaml", ".txt", ".sqlite"}]
    session_logs = Path(ray_2_cpus._private.worker._global_node.get_session_dir_path()) / "logs"
    haystack += [p.read_bytes() for p in session_logs.rglob("*") if p.is_file()]
    from orchestrator.console import LOG

    haystack += [LOG.written().read_bytes()] if LOG.written() else []  # the copy of Ray's messages trdpo keeps
    assert not [h for h in haystack if SECRET.encode() in h]
    assert SECRET not in out + err


def test_eval_cli_with_gold_judge_and_held_out_prompts(ray_2_cpus, tmp_path):
    """`trdpo eval FILE`: prompts from an experiment's held-out split, the python gold judge,
    a policy given as a training run's MLflow artifact."""
    import yaml
    from click.testing import CliRunner

    from orchestrator.cli import main
    from orchestrator.config import default_config_path

    experiment = yaml.safe_load(default_config_path().read_text())
    experiment["data"]["synthetic"]["num_pairs"] = 200
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(experiment))
    import mlflow

    mlflow.set_tracking_uri(sqlite_store(tmp_path / "mlflow.db"))
    mlflow.set_experiment("evals")
    with mlflow.start_run(run_name="a-training-run") as training_run:  # stands in for `trdpo train` output
        mlflow.log_artifacts(save_model(tmp_path / "trained", 4), artifact_path="policy")
    eval_file = {
        "name": "gold", "experiment": "exp.yaml",
        "evaluation": {
            "policies": [{"name": "trained", "mlflow_run_id": training_run.info.run_id}],
            "baseline": {"name": "init", "path": "init"},
            "num_prompts": 5, "num_generation_actors": 1, "bootstrap_resamples": 200,
            "sampling": {"max_new_tokens": 8, "num_samples": 2, "batch_size": 8},
            "judge": {"backend": "python", "function": "trainers.data.synthetic:gold_reward"},
            "cache_path": str(tmp_path / "j.sqlite"),
        },
        "tracking": {"tracking_uri": sqlite_store(tmp_path / "mlflow.db"), "output_dir": str(tmp_path / "out"), "experiment_name": "evals"},
    }
    save_model(tmp_path / "init", 5)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(eval_file))
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "eval.yaml")])
    assert result.exit_code == 0, result.output
    assert "trained vs init: win rate" in result.output
    client = MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("evals").experiment_id], "tags.trdpo.policy = 'trained'")
    assert len(runs) == 1 and runs[0].data.tags["trdpo.policy_train_run"] == training_run.info.run_id
    assert runs[0].data.metrics["eval/comparisons"] == 10  # 5 held-out prompts (the synthetic task has 20) x 2 samples


def test_an_unreachable_judge_fails_the_eval_with_one_line(ray_2_cpus, tmp_path, monkeypatch):
    """A judge nobody answers for: a non-zero exit and one line naming the judge, and the MLflow
    runs end FAILED, not an exit 0 with "win rate nan" and every call counted as an API error."""
    import socket

    import yaml
    from click.testing import CliRunner

    from orchestrator.cli import main

    with socket.socket() as probe:  # a port nothing listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("EVAL_JUDGE_KEY", SECRET)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Review:"}) + "\n")
    eval_file = {
        "name": "down",
        "evaluation": {
            "policies": [{"name": "p", "path": save_model(tmp_path / "p", 1)}], "baseline": {"name": "b", "path": save_model(tmp_path / "b", 2)},
            "prompts_path": "prompts.jsonl", "num_prompts": 1, "bootstrap_resamples": 100,
            "sampling": {"max_new_tokens": 4, "num_samples": 2, "batch_size": 2},
            "judge": {"backend": "openai", "model": "judge-x", "base_url": f"http://127.0.0.1:{port}/v1",
                      "api_key_env": "EVAL_JUDGE_KEY", "max_retries": 1, "timeout_s": 2.0},
            "cache_path": str(tmp_path / "j.sqlite"),
        },
        "tracking": {"tracking_uri": sqlite_store(tmp_path / "mlflow.db"), "output_dir": str(tmp_path / "out"), "experiment_name": "down"},
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(eval_file))
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "eval.yaml")])
    assert result.exit_code != 0
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    assert error_lines[0].startswith(f"error: openai judge 'judge-x' at http://127.0.0.1:{port}/v1: "
                                     "no judgment succeeded for p vs b [hh] (2 API errors, 0 parse failures of 2; "
                                     "first error: connection error")
    assert SECRET not in result.output
    client = MlflowClient(sqlite_store(tmp_path / "mlflow.db"))
    runs = client.search_runs([client.get_experiment_by_name("down").experiment_id])
    assert runs and all(r.info.status == "FAILED" for r in runs)


def test_a_judge_actor_that_cannot_start_gives_counted_errors(ray_2_cpus, tmp_path):
    """A judge actor that dies (here: its local judge model does not exist) fails its items as API
    errors; the pool returns every item and raises nothing."""
    from evaluation.config import JudgeConfig
    from evaluation.pool import judge_with_pool
    from evaluation.protocol import Item

    items = [Item(str(i), "q", "a", "b") for i in range(5)]
    cfg = JudgeConfig(backend="hf", model=str(tmp_path / "no-such-model"), template="hh")
    results, calls = judge_with_pool(items, cfg, str(tmp_path / "j.sqlite"), num_actors=2, both_orders=True)
    assert [r.item_id for r in results] == [i.item_id for i in items] and calls == 0
    assert {r.outcome for r in results} == {"api_error"}
    assert all(r.errors[0].startswith("judge actor failed: ") for r in results)


def test_a_judge_setting_that_fails_on_the_workers_stops_the_evaluation_in_one_line(ray_2_cpus, tmp_path, monkeypatch):
    """The scorer imports where trdpo runs but not in the judge actors (a module not shipped to
    the cluster). The setting error itself reaches the driver, to be shown as one line: counted as
    an API error per item, it would read as a flaky judge."""
    from evaluation.config import JudgeConfig
    from evaluation.judges import JudgeSettingError
    from evaluation.pool import judge_with_pool
    from evaluation.protocol import Item

    (tmp_path / "driver_only_scorer.py").write_text("def score(prompt, response):\n    return float(len(response))\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # this process only: the actors started long before
    cfg = JudgeConfig(backend="python", function="driver_only_scorer:score")
    check_judge(EvaluationConfig(judge=cfg))  # fine here
    items = [Item(str(i), "q", "a longer answer", "short") for i in range(4)]
    with pytest.raises(JudgeSettingError) as raised:
        judge_with_pool(items, cfg, str(tmp_path / "j.sqlite"), num_actors=2, both_orders=False)
    # The error itself (not Ray's wrapper, whose text is a remote traceback): the CLI shows it as one line.
    assert type(raised.value) is JudgeSettingError
    assert str(raised.value).startswith("evaluation.judge.function: cannot import 'driver_only_scorer:score' (No module named")


def test_a_criterion_no_judgment_of_which_succeeded_is_absent_not_a_failed_evaluation(ray_2_cpus, tmp_path):
    """The judge answers the main template but never gives a 1-10 score for the criterion: the
    evaluation stands, the criterion's counts say why, and it has no win rate (not 0, not NaN)."""
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": f"Review {i}:"}) + "\n" for i in range(2)))
    with LoopbackJudge(seed=0) as server:
        cfg = EvaluationConfig.model_validate({
            "policies": [{"name": "p", "path": save_model(tmp_path / "p", 1)}], "baseline": {"name": "b", "path": save_model(tmp_path / "b", 2)},
            "prompts_path": str(prompts_file), "num_prompts": 2, "criteria": ["helpfulness"], "criteria_mode": "score",
            "bootstrap_resamples": 100, "sampling": {"max_new_tokens": 4, "num_samples": 1, "batch_size": 2},
            "judge": {"backend": "openai", "model": "loopback", "base_url": server.base_url, "template": "hh", "max_retries": 0},
            "num_generation_actors": 1, "num_judge_actors": 1, "cache_path": str(tmp_path / "j.sqlite"),
        })
        tracking = TrackingConfig(tracking_uri=sqlite_store(tmp_path / "mlflow.db"), output_dir=str(tmp_path / "out"), experiment_name="crit")
        [summary] = run_evaluation(cfg, tracking, "criterion", eval_prompts(cfg, None), num_cpus_per_actor=0.5)
    m = summary.metrics
    assert m["eval/comparisons"] == 2 and "eval/win_rate" in m
    assert m["eval/helpfulness/parse_failures"] == m["eval/helpfulness/comparisons"] == 2
    assert not [k for k in m if k.startswith("eval/helpfulness/") and ("win_rate" in k or "score_mean" in k or "flip" in k)]
    logged = MlflowClient(tracking.resolved_tracking_uri()).get_run(summary.run_id).data.metrics
    assert "eval/helpfulness/win_rate" not in logged and logged["eval/helpfulness/parse_failures"] == 2


def test_a_judge_pool_starts_its_actors_once_per_setting(ray_2_cpus, tmp_path):
    """An evaluation judges every policy and criterion on one pool: its actors start once per judge
    setting (template included), not once per policy, and each call counts only its own requests."""
    from ray.util.state import list_actors

    from evaluation.config import JudgeConfig
    from evaluation.pool import JudgePool
    from evaluation.protocol import Item

    def judge_actors_started() -> int:
        return len(list_actors(filters=[("class_name", "=", "JudgeActor")], limit=10_000))

    items = [Item(str(i), f"Review {i}:", "a good one", "an answer") for i in range(6)]
    before = judge_actors_started()
    with LoopbackJudge(seed=0) as server, JudgePool(str(tmp_path / "j.sqlite"), num_actors=2) as pool:
        cfg = JudgeConfig(backend="openai", model="loopback", base_url=server.base_url, template="hh", max_retries=0)
        counted = []
        for batch in (items[:3], items[3:]):  # two policies' comparisons
            served = server.calls
            results, calls = pool.judge(batch, cfg, both_orders=True)
            counted.append((calls, server.calls - served))
            assert [r.item_id for r in results] == [i.item_id for i in batch] and {r.outcome for r in results} == {"win"}
        assert judge_actors_started() - before == 2  # one set of 2 actors for both
        pool.judge(items[:2], cfg.model_copy(update={"template": "helpfulness"}), both_orders=True)
        assert judge_actors_started() - before == 4  # another template: a set of its own
    assert counted == [(6, 6), (6, 6)]  # 3 items x both orders each time
