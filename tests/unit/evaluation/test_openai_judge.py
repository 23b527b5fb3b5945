"""The OpenAI-compatible judge against a real loopback HTTP server that injects faults."""

from __future__ import annotations

import asyncio

import pytest

from evaluation.cache import JudgmentCache
from evaluation.config import JudgeConfig
from evaluation.judges import OpenAIJudge, backoff_delay, load_template
from loopback_judge import LoopbackJudge
from evaluation.metrics import win_rate
from evaluation.protocol import Item, judge_items

SECRET = "sk-test-DO-NOT-LEAK-4242"


def make_items(n: int) -> list[Item]:
    # Policy responses say "good" twice, baseline once, except every 5th item where both say it once (a tie).
    items = []
    for i in range(n):
        policy = "a good good answer" if i % 5 else "a good answer"
        items.append(Item(f"item-{i}", f"Question {i}?", policy + f" #{i}", f"a good reply #{i}"))
    return items


def judge_for(server, tmp_path, monkeypatch, **cfg) -> OpenAIJudge:
    monkeypatch.setenv("LOOPBACK_JUDGE_KEY", SECRET)
    config = JudgeConfig(backend="openai", model="loopback-judge", base_url=server.base_url, api_key_env="LOOPBACK_JUDGE_KEY",
                         **({"template": "hh", "timeout_s": 0.5, "max_retries": 4} | cfg))
    return OpenAIJudge(config, JudgmentCache(tmp_path / "cache.sqlite"), backoff_base_s=0.01, backoff_cap_s=0.2)


def test_faults_are_retried_counted_and_never_dropped(tmp_path, monkeypatch):
    faults = {"429": 0.15, "500": 0.1, "timeout": 0.03, "drop": 0.05, "malformed": 0.08}
    with LoopbackJudge(faults=faults, seed=3, timeout_sleep_s=1.0) as server:
        judge = judge_for(server, tmp_path, monkeypatch, max_retries=2)
        items = make_items(60)
        results = asyncio.run(judge_items(judge, items, both_orders=True, concurrency=8))
        first_calls = server.calls
        assert server.authorization_headers[0] == f"Bearer {SECRET}"  # the key does reach the judge
    assert len(results) == len(items) and [r.item_id for r in results] == [i.item_id for i in items]
    summary = win_rate([r.to_outcome() for r in results])
    assert summary.wins + summary.losses + summary.ties + summary.parse_failures + summary.api_errors == len(items)
    assert summary.parse_failures > 0  # malformed verdicts are counted as such, not as losses
    assert set(server.fault_counts) == set(faults)  # every kind of fault really happened
    assert first_calls > 2 * len(items)  # retries happened
    # Without faults every answered pair is a win, except the designed ties.
    assert summary.losses == 0

    # Each answer with no verdict is kept with its item, so a user can see why it failed.
    unparsed = [a for r in results for a in r.unparsed_answers]
    assert len(unparsed) == sum(v is None for r in results for v in r.verdicts) > 0
    assert set(unparsed) == {"Both have merits; I cannot say."}

    # A rerun (faults gone) calls the judge only for what is not cached: the failed judgments and
    # the answers with no verdict (never cached, so never replayed as parse failures).
    failed_judgments = sum(1 for r in results for v in r.verdicts if v == "error")
    with LoopbackJudge(seed=4) as clean:
        judge = judge_for(clean, tmp_path, monkeypatch)
        rerun = asyncio.run(judge_items(judge, items, both_orders=True, concurrency=8))
        assert clean.calls == failed_judgments + len(unparsed)
    again = win_rate([r.to_outcome() for r in rerun])
    assert again.api_errors == 0 and again.losses == 0 and again.parse_failures == 0
    assert again.wins + again.ties == len(items)
    assert not any(r.unparsed_answers for r in rerun)


def test_rate_limit_retry_after_is_honoured(tmp_path, monkeypatch):
    with LoopbackJudge(faults={"429": 1.0}, retry_after_s=0.2) as server:
        judge = judge_for(server, tmp_path, monkeypatch, max_retries=2)
        import time

        start = time.perf_counter()
        result = asyncio.run(judge.judge("q", "a", "b"))
        elapsed = time.perf_counter() - start
    assert result.verdict == "error" and "429" in result.error and result.attempts == 3
    assert server.calls == 3 and elapsed >= 0.4  # two waits of Retry-After = 0.2 s


def test_cache_key_depends_on_order_and_template(tmp_path, monkeypatch):
    with LoopbackJudge() as server:
        judge = judge_for(server, tmp_path, monkeypatch)
        assert judge.key("p", "x", "y") != judge.key("p", "y", "x")
        first = asyncio.run(judge.judge("p", "a good x", "y"))
        second = asyncio.run(judge.judge("p", "a good x", "y"))
        assert first.verdict == "A" and second.cached and server.calls == 1
        assert SECRET not in (tmp_path / "cache.sqlite").read_bytes().decode("latin-1")


def test_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ValueError, match="environment variable NOT_SET_ANYWHERE is not set"):
        OpenAIJudge(JudgeConfig(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", api_key_env="NOT_SET_ANYWHERE"))


def test_backoff_and_templates():
    import random

    rng = random.Random(0)
    assert backoff_delay(0, 0.5, 30, retry_after=7.0, rng=rng) == 7.0
    assert all(0 <= backoff_delay(a, 0.5, 4.0, None, rng) <= min(4.0, 0.5 * 2**a) for a in range(8))
    for name in ("hh", "tldr", "coherence", "correctness", "level_of_detail", "helpfulness", "harmlessness"):
        template = load_template(name)
        system, user = template.render("P", "RA", "RB")
        assert template.version.endswith("-v1") and "[[A]]" in system + user and "RA" in user and "RB" in user
    for name in ("coherence", "correctness", "level_of_detail", "helpfulness", "harmlessness"):
        template = load_template(f"{name}_score")
        system, user = template.render("P", "RA", "")
        assert template.version == f"{name}-score-v1" and "[[N]]" in user and "RA" in user


def test_cache_opens_safely_from_many_processes(tmp_path):
    """Judge actors open the cache at the same moment; none may fail with 'database is locked'."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(6) as pool:
        counts = pool.map(_open_and_write, [(str(tmp_path / "c.sqlite"), i) for i in range(12)])
    assert counts and len(JudgmentCache(tmp_path / "c.sqlite")) == 12


def _open_and_write(args):
    path, i = args
    cache = JudgmentCache(path)
    cache.put(f"k{i}", backend="b", model="m", template_version="v", decoding={}, prompt="p", response_a="a",
              response_b="b", raw_output="[[A]]", usage={}, latency_s=0.0)
    return len(cache)


def test_rate_limiter_spaces_request_starts():
    """20 requests/s: 11 starts need at least 10 intervals of 50 ms."""
    import time

    from evaluation.judges import RateLimiter

    async def burst():
        limiter = RateLimiter(20.0)
        start = time.perf_counter()
        await asyncio.gather(*(limiter.wait() for _ in range(11)))
        return time.perf_counter() - start

    assert asyncio.run(burst()) >= 0.45
    assert asyncio.run(asyncio.wait_for(RateLimiter(None).wait(), 1)) is None


def test_criterion_scores_mode(tmp_path, monkeypatch):
    """1-10 ratings of each response: the higher rating wins; unparseable ratings are parse failures."""
    from evaluation.verdicts import parse_score

    assert parse_score("Solid. [[7]]") == 7.0 and parse_score("Rating: 9") == 9.0
    assert parse_score("[[11]]") is None and parse_score("no idea") is None

    class RatingServer(LoopbackJudge):
        def verdict(self, user_message: str) -> str:  # rate by how often "good" appears
            response = user_message.split("[Response]\n", 1)[1].split("\n\nRate", 1)[0]
            return f"[[{min(10, 1 + 3 * response.split().count('good'))}]]"

    with RatingServer() as server:
        judge = judge_for(server, tmp_path, monkeypatch, template="helpfulness_score")
        items = [Item("1", "q", "good good", "good"), Item("2", "q", "meh", "good"), Item("3", "q", "good", "good")]
        results = asyncio.run(judge_items(judge, items, mode="score"))
    assert [r.outcome for r in results] == ["win", "loss", "tie"]
    assert (results[0].policy_score, results[0].baseline_score) == (7.0, 4.0)


def test_truncated_replies_are_retried_and_never_abort(tmp_path, monkeypatch):
    """A 200 application/json reply cut short made the OpenAI client raise JSONDecodeError out of
    the judge: one such reply in 40 ended a whole evaluation. Now it is retried like a 5xx, and
    counted as an API error only when every attempt fails."""
    with LoopbackJudge(faults={"truncated": 0.025}, seed=7) as server:
        judge = judge_for(server, tmp_path, monkeypatch, max_retries=3)
        items = make_items(200)
        results = asyncio.run(judge_items(judge, items, both_orders=True, concurrency=16))
    assert server.fault_counts["truncated"] >= 5 and server.calls == 2 * len(items) + server.fault_counts["truncated"]
    summary = win_rate([r.to_outcome() for r in results])
    # Every truncated reply was retried and answered: the same result as a clean judge.
    assert summary.total == len(items) and summary.api_errors == 0 and summary.losses == 0
    assert summary.ties == len(items) // 5 and summary.wins == len(items) - len(items) // 5

    # When every reply is cut short, each judgment ends as a counted error naming the cause.
    with LoopbackJudge(faults={"truncated": 1.0}) as broken:
        judge = judge_for(broken, tmp_path / "other", monkeypatch, max_retries=1)
        results = asyncio.run(judge_items(judge, make_items(3), both_orders=True))
    assert broken.calls == 3 * 2 * 2  # items x orders x attempts
    assert [r.outcome for r in results] == ["api_error"] * 3
    assert all(e.startswith("malformed response (JSONDecodeError") for r in results for e in r.errors)


def test_any_exception_from_a_judge_is_one_counted_error():
    """Judges retry what is worth retrying; whatever still escapes a call (a local judge's crash, a
    bug in handling a reply) is that item's api_error outcome, not the end of the evaluation."""

    class Flaky:
        async def judge(self, prompt, a, b):
            if "boom" in prompt:
                raise RuntimeError("CUDA error: out of memory")
            from evaluation.judges import Judgment

            return Judgment("A" if "good" in a else "B", attempts=1)

        async def rate(self, prompt, response):
            raise KeyError("usage")

    items = [Item("1", "fine", "good", "bad"), Item("2", "boom", "good", "bad")]
    results = asyncio.run(judge_items(Flaky(), items, both_orders=True))
    assert [r.outcome for r in results] == ["win", "api_error"]
    assert results[1].errors == ["RuntimeError: CUDA error: out of memory"] * 2
    single = asyncio.run(judge_items(Flaky(), items, both_orders=False))
    assert [r.outcome for r in single] == ["win", "api_error"]
    rated = asyncio.run(judge_items(Flaky(), items, mode="score"))
    assert [r.outcome for r in rated] == ["api_error", "api_error"] and rated[0].errors == ["KeyError: 'usage'"] * 2
