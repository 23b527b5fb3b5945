"""The judging protocol: both presentation orders by default, or one seeded random order.

For each item (prompt, policy response, baseline response) a pairwise judge is asked twice —
(A=policy, B=baseline) and (A=baseline, B=policy) — and the two verdicts combine into one
outcome (``evaluation.metrics.combine_orders``): agreement decides, disagreement is a tie and a
position flip. Score judges score each response once; order cannot matter for them.
Every item yields a record: nothing is dropped, failures are outcomes of their own.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass, field

from evaluation.judges import Judgment
from evaluation.metrics import Outcome, combine_orders, from_scores, single_order


@dataclass(frozen=True)
class Item:
    item_id: str
    prompt: str
    policy: str
    baseline: str


@dataclass
class ItemResult:
    item_id: str
    outcome: str
    flipped: bool
    verdicts: list  # per order: verdict or "error"
    errors: list
    judge_calls: int
    cached: int
    latency_s: float
    usage_tokens: int
    policy_length: int
    baseline_length: int
    policy_score: float | None = None
    baseline_score: float | None = None
    unparsed_answers: list = field(default_factory=list)  # the judge's raw answers with no verdict: why they failed

    def to_outcome(self) -> Outcome:
        return Outcome(self.outcome, self.flipped, self.policy_length, self.baseline_length)

    def as_dict(self) -> dict:
        return asdict(self)


def _tokens(usage: dict) -> int:
    return int(usage.get("total_tokens") or 0)


def failed_item(item: Item, error: str) -> ItemResult:
    """The record of an item whose judging failed outside any one call (its judge actor died)."""
    return ItemResult(item.item_id, "api_error", False, ["error"], [error], 0, 0, 0.0, 0,
                      len(item.policy.split()), len(item.baseline.split()))


async def _guarded(call) -> Judgment:
    """``await call()``, where any exception is one failed judgment (verdict "error", counted as an
    API error) and never the end of the evaluation: judges retry what is worth retrying themselves,
    and what still escapes (a local judge's crash, a bug in a reply's handling) is one outcome."""
    try:
        return await call()
    except Exception as exc:  # noqa: BLE001 - see above
        return Judgment("error", attempts=1, error=f"{type(exc).__name__}: {str(exc)[:200]}")


async def rate_item(judge, item: Item) -> ItemResult:
    """Absolute ratings of both responses (1-10); the higher one wins, equal ratings tie."""
    lengths = (len(item.policy.split()), len(item.baseline.split()))
    policy, baseline = await asyncio.gather(_guarded(lambda: judge.rate(item.prompt, item.policy)),
                                            _guarded(lambda: judge.rate(item.prompt, item.baseline)))
    judgments = [policy, baseline]
    if "error" in (policy.verdict, baseline.verdict):
        outcome = Outcome("api_error")
    elif None in (policy.verdict, baseline.verdict):
        outcome = Outcome("parse_failure")
    else:
        outcome = from_scores(policy.verdict, baseline.verdict)
    scores = [j.verdict if isinstance(j.verdict, float) else None for j in judgments]
    return ItemResult(item.item_id, outcome.result, False, [j.verdict for j in judgments], [j.error for j in judgments if j.error],
                      sum(j.attempts for j in judgments), sum(j.cached for j in judgments), sum(j.latency_s for j in judgments),
                      sum(_tokens(j.usage) for j in judgments), *lengths, *scores, unparsed_answers=_unparsed(judgments))


async def judge_item(judge, item: Item, both_orders: bool, rng_seed: int, mode: str = "pairwise") -> ItemResult:
    if mode == "score":
        return await rate_item(judge, item)
    lengths = (len(item.policy.split()), len(item.baseline.split()))
    if hasattr(judge, "score"):
        try:
            p, b = judge.score(item.prompt, item.policy), judge.score(item.prompt, item.baseline)
            outcome, errors = from_scores(p, b), []
        except Exception as exc:  # noqa: BLE001 - a scorer failure is an api_error outcome, never a crash
            p = b = None
            outcome, errors = Outcome("api_error"), [f"{type(exc).__name__}: {exc}"]
        return ItemResult(item.item_id, outcome.result, False, [], errors, 0, 0, 0.0, 0, *lengths, p, b)
    if both_orders:
        first, second = await asyncio.gather(_guarded(lambda: judge.judge(item.prompt, item.policy, item.baseline)),
                                             _guarded(lambda: judge.judge(item.prompt, item.baseline, item.policy)))
        judgments = [first, second]
        outcome = combine_orders(first.verdict, second.verdict)
    else:
        policy_first = random.Random(f"{rng_seed}:{item.item_id}").random() < 0.5
        a, b = (item.policy, item.baseline) if policy_first else (item.baseline, item.policy)
        judgments = [await _guarded(lambda: judge.judge(item.prompt, a, b))]
        outcome = single_order(judgments[0].verdict, policy_first)
    return ItemResult(
        item.item_id, outcome.result, outcome.flipped, [j.verdict for j in judgments], [j.error for j in judgments if j.error],
        sum(j.attempts for j in judgments), sum(j.cached for j in judgments), sum(j.latency_s for j in judgments),
        sum(_tokens(j.usage) for j in judgments), *lengths, unparsed_answers=_unparsed(judgments),
    )


def _unparsed(judgments: list[Judgment]) -> list[str]:
    return [j.raw_output for j in judgments if j.verdict is None]


def item_gate(concurrency: int, both_orders: bool) -> asyncio.Semaphore:
    """At most ``concurrency`` judge requests in flight: an item judged in both orders sends two."""
    return asyncio.Semaphore(max(1, concurrency // 2) if both_orders else concurrency)


async def judge_items(judge, items: list[Item], both_orders: bool = True, seed: int = 0, concurrency: int = 8,
                      gate: asyncio.Semaphore | None = None, mode: str = "pairwise") -> list[ItemResult]:
    """Judge all items, results in input order. ``gate`` lets several calls share one limit;
    ``mode`` "score" rates each response 1-10 instead of comparing them."""
    gate = gate or item_gate(concurrency, both_orders or mode == "score")

    async def one(item: Item) -> ItemResult:
        async with gate:
            return await judge_item(judge, item, both_orders, seed, mode)

    return list(await asyncio.gather(*(one(item) for item in items)))
