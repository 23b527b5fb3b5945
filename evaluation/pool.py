"""The evaluation actor pool: generation actors (one model loaded once each) and async judge
actors (many judge requests in flight per actor, one shared judgment cache).

Work is split into contiguous chunks; results come back in input order, so the output does not
depend on the number of actors. Progress lines report rate and ETA.
"""

from __future__ import annotations

import sys
import time

import ray

from evaluation.config import JudgeConfig, SamplingConfig
from evaluation.protocol import Item, ItemResult, failed_item, item_gate, judge_items
from trainers.errors import user_facing_cause


@ray.remote
class GenerationActor:
    """Samples from one model at a time; switching models reloads, the process (and its imports)
    stays: one pool serves every model of an evaluation."""

    def __init__(self, num_threads: int = 1):
        import torch

        torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.path, self.model, self.tokenizer = None, None, None

    def generate(self, model_path: str, prompts: list[tuple[str, str]], cfg: SamplingConfig, batch_offset: int) -> list:
        from evaluation.generation import generate, load_policy

        if model_path != self.path:
            self.model = self.tokenizer = None  # free the previous model before loading the next
            self.model, self.tokenizer = load_policy(model_path)
            self.model.to(self.device)
            self.path = model_path
        return generate(self.model, self.tokenizer, prompts, cfg, batch_offset=batch_offset)


class GenerationPool:
    """``num_actors`` generation actors for the length of a ``with`` block, started at the first
    ``generate`` (a block whose samples are all known already starts none)."""

    def __init__(self, num_actors: int, cpus_per_actor: float = 1.0):
        self.num_actors, self.cpus_per_actor = num_actors, cpus_per_actor
        self._actors: list | None = None

    @property
    def actors(self) -> list:
        if self._actors is None:
            self._actors = [GenerationActor.options(num_cpus=self.cpus_per_actor).remote(max(1, int(self.cpus_per_actor)))
                            for _ in range(self.num_actors)]
        return self._actors

    def __enter__(self) -> "GenerationPool":
        return self

    def __exit__(self, *exc) -> None:
        for actor in self._actors or []:
            ray.kill(actor)

    def generate(self, model_path: str, prompts: list[tuple[str, str]], cfg: SamplingConfig, label: str = "generate") -> list:
        """Samples for every prompt (``num_samples`` each), in prompt order."""
        # Chunks are whole batches, so each batch keeps its global index (and so its seed).
        batches = [prompts[i : i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
        pending = {}
        for index, (start, group) in enumerate(_chunks(batches, len(self.actors))):
            flat = [p for batch in group for p in batch]
            pending[self.actors[index % len(self.actors)].generate.remote(model_path, flat, cfg, start)] = start
        return _collect(pending, len(prompts) * cfg.num_samples, label, weight=lambda out: len(out))


@ray.remote
class JudgeActor:
    """Async actor: ``judge`` calls overlap up to ``max_concurrency``."""

    def __init__(self, cfg: JudgeConfig, cache_path: str, rate_share: int, api_key):
        from evaluation.cache import JudgmentCache
        from evaluation.judges import build_judge
        from trainers.errors import UserFacingError

        self.cfg = cfg
        self.setting_error = None
        try:
            self.judge = build_judge(cfg, JudgmentCache(cache_path), rate_share, api_key)
        except UserFacingError as exc:
            # Raised from __init__, Ray would keep only its text (ActorDiedError); raised from a
            # method it reaches the driver as itself (RayTaskError.cause), to be shown as one line.
            self.judge, self.setting_error = None, exc
        self.gate = None  # one request limit for all concurrent calls to this actor

    async def judge(self, items: list[Item], both_orders: bool, seed: int, mode: str = "pairwise") -> list[ItemResult]:
        if self.setting_error is not None:
            raise self.setting_error
        if self.gate is None:
            self.gate = item_gate(self.cfg.concurrency, both_orders or mode == "score")
        return await judge_items(self.judge, items, both_orders, seed, gate=self.gate, mode=mode)

    def calls(self) -> int:
        return getattr(self.judge, "calls", 0)


def _chunks(items: list, n: int) -> list[tuple[int, list]]:
    size = max(1, -(-len(items) // n))
    return [(start, items[start : start + size]) for start in range(0, len(items), size)]


@ray.remote
def _sampled_kl(policy_path: str, reference_path: str, prompts: list[str], num_samples: int, max_new_tokens: int, seed: int,
                num_threads: int) -> list[dict]:
    import torch

    from evaluation.generation import load_policy
    from evaluation.kl import sampled_kl

    torch.set_num_threads(num_threads)
    policy, tokenizer = load_policy(policy_path)
    reference, _ = load_policy(reference_path)
    estimate = sampled_kl(policy, reference, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                          seed=seed)
    return [{**estimate.as_metrics("eval/kl"), "eval/kl_truncated_fraction": estimate.truncated_fraction}]


def sampled_kl_with_pool(policy_paths: dict[str, str], reference_path: str, prompts: list[tuple[str, str]], num_samples: int,
                         max_new_tokens: int, seed: int = 0, cpus_per_task: float = 1.0) -> dict[str, dict]:
    """KL(policy || reference) of every policy from its own samples (temperature 1), one task per
    policy, as many at a time as the cluster has CPUs: ``{name: {"eval/kl": ..., ...}}``."""
    texts = [text for _, text in prompts]
    pending = {_sampled_kl.options(num_cpus=cpus_per_task).remote(path, reference_path, texts, num_samples, max_new_tokens, seed,
                                                                  max(1, int(cpus_per_task))): name
               for name, path in policy_paths.items()}
    names = list(pending.values())
    outputs = _collect({ref: index for index, ref in enumerate(pending)}, len(names), "sampled KL", weight=len)
    return dict(zip(names, outputs))


class JudgePool:
    """Judge actors for the length of a ``with`` block, one set per judge setting (template
    included), reused by every call with that setting: an actor costs a process start and the
    judge's imports (a local judge also loads its model), paid once per setting of an evaluation,
    not once per policy and template. A set in which an actor failed is replaced at its next use."""

    def __init__(self, cache_path: str, num_actors: int):
        self.cache_path, self.num_actors = cache_path, num_actors
        self._sets: dict[str, list] = {}

    def __enter__(self) -> "JudgePool":
        return self

    def __exit__(self, *exc) -> None:
        for key in list(self._sets):
            self._discard(key)

    def _discard(self, key: str) -> None:
        for actor in self._sets.pop(key, []):
            ray.kill(actor)

    def judge(self, items: list[Item], cfg: JudgeConfig, both_orders: bool, seed: int = 0, label: str = "judge",
              mode: str = "pairwise") -> tuple[list[ItemResult], int]:
        """Judge items on the setting's actors; returns results in item order and HTTP calls made."""
        from evaluation.judges import read_api_key

        api_key = read_api_key(cfg) if cfg.backend == "openai" else None  # fails here, before any actor starts
        key = cfg.model_dump_json()
        if key not in self._sets:
            self._sets[key] = [JudgeActor.options(max_concurrency=cfg.concurrency, num_cpus=0).remote(
                cfg, self.cache_path, self.num_actors, api_key) for _ in range(self.num_actors)]
        actors = self._sets[key]
        calls_before = _calls(actors)
        pending, chunks, failed = {}, {}, []
        # Small chunks keep every actor busy until the end (and the progress line moving).
        for index, (start, chunk) in enumerate(_chunks(items, self.num_actors * 4)):
            pending[actors[index % self.num_actors].judge.remote(chunk, both_orders, seed, mode)] = start
            chunks[start] = chunk

        def chunk_failed(start: int, exc: Exception) -> list[ItemResult]:
            # Calls never raise (judge_items turns each failure into an outcome), so this is the
            # actor itself failing. A setting that cannot work on this node (a template file or
            # scorer module missing there) stops the evaluation with its own one-line message;
            # an actor that crashed or died has its items counted as API errors, like any other,
            # and the other chunks' judgments are kept.
            setting = user_facing_cause(exc)
            if setting is not None:
                raise setting from None
            failed.append(start)
            message = f"judge actor failed: {_last_line(exc)}"
            return [failed_item(item, message) for item in chunks[start]]

        results = _collect(pending, len(items), label, weight=lambda out: len(out), on_error=chunk_failed)
        calls_after = _calls(actors)
        # A dead actor's calls are lost with it; its items are already counted as errors.
        calls = sum(after - calls_before[i] for i, after in calls_after.items() if i in calls_before)
        if failed:
            self._discard(key)
        return results, calls


def _calls(actors: list) -> dict[int, int]:
    """HTTP calls each live actor has made so far, by position."""
    counts = {}
    for index, actor in enumerate(actors):
        try:
            counts[index] = ray.get(actor.calls.remote())
        except ray.exceptions.RayError:
            pass
    return counts


def judge_with_pool(items: list[Item], cfg: JudgeConfig, cache_path: str, num_actors: int, both_orders: bool,
                    seed: int = 0, label: str = "judge", mode: str = "pairwise") -> tuple[list[ItemResult], int]:
    """Judge items on ``num_actors`` async actors of their own (a :class:`JudgePool` for one call);
    returns results in item order and HTTP calls made."""
    with JudgePool(cache_path, num_actors) as pool:
        return pool.judge(items, cfg, both_orders, seed, label, mode)


def _last_line(exc: Exception) -> str:
    """The cause of a Ray task error without its remote traceback."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _collect(pending: dict, total: int, label: str, weight, on_error=None) -> list:
    """Wait for all refs, printing progress when it changed (at most every 2 s); return outputs
    concatenated by start index. ``on_error(start, exc)``, when given, stands in for the output of a
    task that failed."""
    outputs, done, started, last_print, shown = {}, 0, time.perf_counter(), 0.0, None
    refs = list(pending)
    while refs:
        ready, refs = ray.wait(refs, num_returns=1, timeout=2.0)
        for ref in ready:
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if on_error is None:
                    raise
                out = on_error(pending[ref], exc)
            outputs[pending[ref]] = out
            done += weight(out)
        now = time.perf_counter()
        if done != shown and (now - last_print > 2.0 or not refs):
            rate = done / max(now - started, 1e-9)
            eta = f"ETA {(total - done) / rate:.0f}s" if rate > 0 else "ETA ?"
            print(f"[{label}] {done}/{total} ({rate:.1f}/s, {eta})", file=sys.stderr, flush=True)
            last_print, shown = now, done
    return [x for start in sorted(outputs) for x in outputs[start]]
