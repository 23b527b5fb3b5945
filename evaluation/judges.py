"""Judge backends. Two kinds:

* pairwise judges read a prompt template and answer which of two responses is better:
  ``openai`` (any OpenAI-compatible chat endpoint: OpenAI, vLLM, TGI, ...) and ``hf`` (a local
  causal LM whose verdict is the likelier of the tokens "A" and "B");
* score judges give each response a number, and the better number wins (order cannot matter):
  ``reward_model`` (a local sequence classifier) and ``python`` (a ``module:function`` gold scorer).

The OpenAI judge is async (many requests in flight per actor), retries 429s, 5xx, timeouts,
dropped connections and malformed (e.g. truncated) bodies with exponential backoff and jitter,
honours ``Retry-After``, and records token usage and latency. No failure of one call escapes: what
is not retried, or still fails after the last retry, is a judgment with verdict "error". Its API
key is read from the environment variable the config names and is never stored, logged or hashed.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import random
import time
from dataclasses import dataclass, field
from importlib import resources

from evaluation.cache import JudgmentCache, judgment_key
from evaluation.config import JudgeConfig
from evaluation.verdicts import parse_score, parse_verdict
from trainers.errors import UserFacingError


@dataclass(frozen=True)
class Template:
    name: str
    version: str
    system: str
    user: str

    def render(self, prompt: str, response_a: str, response_b: str) -> tuple[str, str]:
        return self.system, self.user.format(prompt=prompt.strip(), response_a=response_a.strip(), response_b=response_b.strip())


def shipped_templates() -> list[str]:
    """Names of the templates that ship in the package (evaluation/templates/*.txt)."""
    folder = resources.files("evaluation") / "templates"
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt")) if folder.is_dir() else []


class JudgeSettingError(UserFacingError, ValueError):
    """A judge setting that cannot work (an unknown or malformed template, an unset key variable,
    a scorer that does not import), wherever it is found: in the driver, or in a judge actor on a
    node that lacks the file or module."""


def load_template(name: str) -> Template:
    """A versioned template from evaluation/templates/NAME.txt (or a path to such a file):
    ``version: ...`` on the first line, then a ``### system`` and a ``### user`` section."""
    path = resources.files("evaluation") / "templates" / f"{name}.txt"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif os.path.isfile(name):
        text = open(name, encoding="utf-8").read()
    else:
        raise JudgeSettingError(f"evaluation.judge.template: no template {name!r} in the package and no such file "
                                f"(shipped: {', '.join(shipped_templates()) or 'none: the package was installed without its templates'})")
    header, _, rest = text.partition("\n")
    if not header.startswith("version:"):
        raise JudgeSettingError(f"template {name}: first line must be 'version: ...'")
    if "### system\n" not in rest or "### user\n" not in rest.split("### system\n", 1)[1]:
        raise JudgeSettingError(f"template {name}: needs a '### system' section, then a '### user' section")
    system = rest.split("### system\n", 1)[1].split("### user\n", 1)[0].strip()
    user = rest.split("### user\n", 1)[1]
    return Template(name, header.split(":", 1)[1].strip(), system, user)


@dataclass
class Judgment:
    """One pairwise judgment. ``verdict``: "A", "B", "tie", None (unparseable) or "error"."""

    verdict: str | None
    raw_output: str = ""
    usage: dict = field(default_factory=dict)
    latency_s: float = 0.0
    attempts: int = 0
    error: str | None = None
    cached: bool = False


class JudgeUnavailable(UserFacingError, ValueError):
    """No judgment of an evaluation succeeded: the judge is unreachable, refuses the key, or answers
    nothing parseable (the CLI reports it as one line with a non-zero exit)."""


def describe_judge(cfg: JudgeConfig) -> str:
    """The judge as a user would name it (never with its key): "openai judge 'gpt-4o' at URL"."""
    if cfg.backend == "python":
        return f"python judge {cfg.function!r}"
    where = f" at {cfg.base_url}" if cfg.backend == "openai" and cfg.base_url else ""
    return f"{cfg.backend} judge {cfg.model!r}{where}"


class JudgeCallError(Exception):
    def __init__(self, message: str, retry_after: float | None = None, retryable: bool = True):
        super().__init__(message)
        self.retry_after, self.retryable = retry_after, retryable


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random) -> float:
    """Retry-After when the server gives one, else exponential backoff with full jitter."""
    if retry_after is not None:
        return min(cap, retry_after)
    return rng.uniform(0, min(cap, base * 2**attempt))


class RateLimiter:
    """Spaces request starts at least ``1 / rate`` seconds apart (per actor: rate = pool rate / actors)."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


class Secret:
    """A value that never shows itself in a repr, a log line or a traceback."""

    def __init__(self, value: str | None):
        self.value = value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def read_api_key(cfg: JudgeConfig) -> Secret:
    """The judge's key from the environment variable the config names (in the driver, which then
    hands it to the judge actors as an argument: actors do not see variables set after Ray started)."""
    if not cfg.api_key_env:
        return Secret(None)
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise JudgeSettingError(f"evaluation.judge.api_key_env: environment variable {cfg.api_key_env} is not set")
    return Secret(key)


class OpenAIJudge:
    """Pairwise judge over the OpenAI chat-completions protocol."""

    backend = "openai"

    def __init__(self, cfg: JudgeConfig, cache: JudgmentCache | None = None, rate_share: int = 1,
                 backoff_base_s: float = 0.5, backoff_cap_s: float = 30.0, seed: int = 0, api_key: "Secret | None" = None):
        from openai import AsyncOpenAI

        self.cfg, self.cache = cfg, cache
        self.template = load_template(cfg.template)
        key = api_key.value if api_key is not None else read_api_key(cfg).value
        # max_retries=0: retries are ours, so that each one is counted and Retry-After honoured.
        self.client = AsyncOpenAI(base_url=cfg.base_url, api_key=key or "none", timeout=cfg.timeout_s, max_retries=0)
        self.decoding = {"temperature": 0.0, "max_tokens": 512}
        self.limiter = RateLimiter(cfg.requests_per_second / rate_share if cfg.requests_per_second else None)
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self.rng = random.Random(seed)
        self.calls = 0  # HTTP requests actually sent (retries included)

    def key(self, prompt: str, response_a: str, response_b: str) -> str:
        return judgment_key(self.backend, self.cfg.model, self.template.version, self.decoding, prompt, response_a, response_b)

    async def _call(self, system: str, user: str) -> tuple[str, dict]:
        import openai

        await self.limiter.wait()
        self.calls += 1
        try:
            response = await self.client.chat.completions.create(
                model=self.cfg.model, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                **self.decoding,
            )
            choices = getattr(response, "choices", None) or []
            content = choices[0].message.content if choices and choices[0].message else None
            usage = response.usage.model_dump() if getattr(response, "usage", None) else {}
        except openai.RateLimitError as exc:
            raise JudgeCallError("429 rate limited", retry_after=_retry_after(exc.response)) from None
        except openai.APIStatusError as exc:
            retryable = exc.status_code >= 500 or exc.status_code in (408, 409)
            raise JudgeCallError(f"HTTP {exc.status_code}", retry_after=_retry_after(exc.response), retryable=retryable) from None
        except openai.APITimeoutError:
            raise JudgeCallError("timeout") from None
        except openai.APIConnectionError as exc:
            raise JudgeCallError(f"connection error ({type(exc.__cause__).__name__ if exc.__cause__ else 'dropped'})") from None
        except openai.APIError as exc:  # e.g. a body that is not the promised JSON
            raise JudgeCallError(f"malformed response ({type(exc).__name__})") from None
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            # A 200 whose body is cut short or is not the promised shape: the client lets
            # json.JSONDecodeError (a ValueError) and friends out. Often transient: retry.
            raise JudgeCallError(f"malformed response ({type(exc).__name__}: {str(exc)[:200]})") from None
        except Exception as exc:  # noqa: BLE001 - one failed call must never end the evaluation
            raise JudgeCallError(f"unexpected error ({type(exc).__name__}: {str(exc)[:200]})", retryable=False) from None
        if content is None:
            raise JudgeCallError("malformed response: no message content")
        return content, usage

    async def _ask(self, prompt: str, response_a: str, response_b: str, parse) -> Judgment:
        """One cached, retried request; ``parse`` turns the raw answer into the verdict field."""
        key = self.key(prompt, response_a, response_b)
        # Only answers that parsed are cached (an unparseable one is asked again on a rerun); an
        # unparseable entry in an older cache is asked again too.
        if self.cache is not None and (hit := self.cache.get(key)) is not None and (verdict := parse(hit.raw_output)) is not None:
            return Judgment(verdict, hit.raw_output, hit.usage, hit.latency_s, 0, None, cached=True)
        system, user = self.template.render(prompt, response_a, response_b)
        last_error = None
        for attempt in range(self.cfg.max_retries + 1):
            started = time.perf_counter()
            try:
                raw, usage = await self._call(system, user)
            except JudgeCallError as exc:
                last_error = str(exc)
                if not exc.retryable or attempt == self.cfg.max_retries:
                    break
                await asyncio.sleep(backoff_delay(attempt, self.backoff_base_s, self.backoff_cap_s, exc.retry_after, self.rng))
                continue
            latency = time.perf_counter() - started
            verdict = parse(raw)
            if self.cache is not None and verdict is not None:
                self.cache.put(key, backend=self.backend, model=self.cfg.model, template_version=self.template.version,
                               decoding=self.decoding, prompt=prompt, response_a=response_a, response_b=response_b,
                               raw_output=raw, usage=usage, latency_s=latency)
            return Judgment(verdict, raw, usage, latency, attempt + 1)
        return Judgment("error", "", {}, 0.0, self.cfg.max_retries + 1, last_error)

    async def judge(self, prompt: str, response_a: str, response_b: str) -> Judgment:
        """Pairwise: ``verdict`` is "A", "B", "tie", None (unparseable) or "error"."""
        return await self._ask(prompt, response_a, response_b, parse_verdict)

    async def rate(self, prompt: str, response: str) -> Judgment:
        """Absolute 1-10 rating with a ``*_score`` template: ``verdict`` holds the score (or None / "error")."""
        return await self._ask(prompt, response, "", parse_score)


def _retry_after(response) -> float | None:
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return float(value) * scale
            except ValueError:
                return None
    return None


class HFJudge:
    """A local causal LM as pairwise judge: the verdict is the likelier next token of "A" and "B"
    after the rendered template (ties when their log-probabilities are within ``tie_margin``)."""

    backend = "hf"

    def __init__(self, cfg: JudgeConfig, cache: JudgmentCache | None = None, model=None, tokenizer=None, tie_margin: float = 0.0):
        self.cfg, self.cache, self.tie_margin = cfg, cache, tie_margin
        self.template = load_template(cfg.template)
        if model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
            model = AutoModelForCausalLM.from_pretrained(cfg.model)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.decoding = {"kind": "next-token-logprob", "tie_margin": tie_margin}
        self.choice_ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-1] for t in ("A", "B")]

    def key(self, prompt: str, response_a: str, response_b: str) -> str:
        return judgment_key(self.backend, self.cfg.model, self.template.version, self.decoding, prompt, response_a, response_b)

    async def judge(self, prompt: str, response_a: str, response_b: str) -> Judgment:
        import json

        import torch

        key = self.key(prompt, response_a, response_b)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            scores = json.loads(hit.raw_output)
            return Judgment(self._verdict(scores["A"], scores["B"]), hit.raw_output, {}, hit.latency_s, 0, cached=True)
        system, user = self.template.render(prompt, response_a, response_b)
        text = f"{system}\n\n{user}\nVerdict: "
        started = time.perf_counter()
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=True)["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(self.model(input_ids=ids).logits[0, -1].float(), -1)
        scores = {"A": logprobs[self.choice_ids[0]].item(), "B": logprobs[self.choice_ids[1]].item()}
        raw, latency = json.dumps(scores), time.perf_counter() - started
        if self.cache is not None:
            self.cache.put(key, backend=self.backend, model=self.cfg.model, template_version=self.template.version,
                           decoding=self.decoding, prompt=prompt, response_a=response_a, response_b=response_b,
                           raw_output=raw, usage={}, latency_s=latency)
        return Judgment(self._verdict(scores["A"], scores["B"]), raw, {}, latency, 1)

    def _verdict(self, a: float, b: float) -> str:
        return "tie" if abs(a - b) <= self.tie_margin else ("A" if a > b else "B")


class PythonScorer:
    """``module:function(prompt, response) -> float``: a gold reward for synthetic tasks."""

    backend = "python"

    def __init__(self, cfg: JudgeConfig):
        module, _, name = cfg.function.partition(":")
        try:
            self.function = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise JudgeSettingError(f"evaluation.judge.function: cannot import {cfg.function!r} ({exc})") from None

    def score(self, prompt: str, response: str) -> float:
        return float(self.function(prompt, response))


class RewardModelScorer:
    """A local sequence-classification reward model scoring prompt + response."""

    backend = "reward_model"

    def __init__(self, cfg: JudgeConfig, model=None, tokenizer=None):
        if model is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
            model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=1)
        self.model, self.tokenizer = model.eval(), tokenizer

    def score(self, prompt: str, response: str) -> float:
        import torch

        ids = torch.tensor([self.tokenizer(prompt + response, add_special_tokens=True)["input_ids"]])
        with torch.no_grad():
            return float(self.model(input_ids=ids).logits[0, 0])


def is_pairwise(cfg: JudgeConfig) -> bool:
    return cfg.backend in ("openai", "hf")


def build_judge(cfg: JudgeConfig, cache: JudgmentCache | None = None, rate_share: int = 1, api_key: Secret | None = None):
    if cfg.backend == "openai":
        return OpenAIJudge(cfg, cache, rate_share, api_key=api_key)
    if cfg.backend == "hf":
        return HFJudge(cfg, cache)
    if cfg.backend == "python":
        return PythonScorer(cfg)
    return RewardModelScorer(cfg)
