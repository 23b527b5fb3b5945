"""`trdpo eval`'s driver, one comparison at a time on canned judge results (no Ray)."""

from __future__ import annotations

import pytest

from evaluation.config import EvaluationConfig


def eval_config(**judge) -> EvaluationConfig:
    return EvaluationConfig.model_validate({
        "policies": [{"name": "p", "path": "/nonexistent/p"}], "baseline": {"name": "b", "path": "/nonexistent/b"},
        "criteria": ["helpfulness"],
        "judge": {"backend": "openai", "model": "gpt-judge", "base_url": "http://127.0.0.1:9/v1", **judge},
    })


@pytest.fixture(scope="module")
def mlflow_client(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")  # one store: creating one takes seconds


def _compare_with(monkeypatch, client, tmp_path, outcomes: list[tuple[str, int]], **judge):
    """Run the driver's per-comparison step on canned judge results (no Ray): ``outcomes`` holds
    (outcome, policy length in words) per item; baselines are 5 words long."""
    import uuid

    import orchestrator.evaluate as evaluate
    from evaluation.generation import Sample
    from evaluation.protocol import ItemResult

    policy = [Sample(str(i), 0, "q", " ".join(["w"] * n), n, 1.0) for i, (_, n) in enumerate(outcomes)]
    baseline = [Sample(str(i), 0, "q", "b b b b b", 5, 1.0) for i in range(len(outcomes))]
    canned = [ItemResult(f"{i}#0", o, False, ["error" if o == "api_error" else "A"] * 2,
                         ["HTTP 401"] * 2 if o == "api_error" else [], 2, 0, 0.1, 0, n, 5) for i, (o, n) in enumerate(outcomes)]
    monkeypatch.setattr(evaluate, "judge_with_pool", lambda items, *args, **kwargs: (canned, 2 * len(canned)))
    cfg = eval_config(**judge)
    cfg.criteria, cfg.bootstrap_resamples = [], 200
    experiment_id = client.create_experiment(uuid.uuid4().hex)
    parent = client.create_run(experiment_id)
    return evaluate._compare(cfg.policies[0], cfg, [], policy, baseline, [cfg.judge.template], str(tmp_path / "j.sqlite"),
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
    assert "[eval] warning: p vs b: wins separate perfectly by response length" in err

