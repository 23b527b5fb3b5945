"""The bundled synthetic preference task: offline, deterministic, with a known gold reward.

Prompts ask for a short review of an item (``"Review of the lamp:"``). Responses are short word
sequences; the gold reward prefers positive words, penalises negative ones, rewards naming the item
and penalises rambling past ten words:

    gold_reward = #positive - #negative + 1[item named] - 0.5 * max(0, #words - 10)

Pairs are two random responses to one prompt, and which one is "chosen" is drawn from the
Bradley-Terry model on the gold reward, P(a > b) = sigmoid(r_a - r_b): noisy, like human labels.
Because the reward is code, the python judge can score trained policies exactly.

Task ``"proxy"`` (``make_pairs(..., task="proxy")``) draws the same pairs but labels them with a
misspecified proxy of the gold reward, the way a learned reward model picks up spurious cues:

    proxy_reward = #positive - 0.5 * #negative + 1[item named] + 1.0 * #hype + 0.3 * #words

with hype = {very, really, so, quite} (neutral for the gold reward) and no length penalty. On the
pairs the two rewards mostly agree (every response is at most ten words, so the gold penalty never
fires there), but the proxy also prefers longer, hyped, less critical responses. A policy that
follows the proxy labels too far writes long strings of hype words, which the gold reward scores
at zero per word inside ten words and -0.5 per word beyond: the further the policy moves from its
starting point in the proxy's direction, the more gold reward it can lose (over-optimisation).
The ``chosen_reward``/``rejected_reward`` of every pair stay the *gold* rewards, and evaluation
still judges with ``gold_reward``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Literal

ITEMS = (
    "lamp", "chair", "kettle", "bike", "phone", "book", "tent", "jacket", "camera", "clock",
    "desk", "radio", "watch", "boots", "piano", "sofa", "scarf", "oven", "drill", "mug",
)
POSITIVE = ("great", "lovely", "superb", "fine", "bright", "warm", "clean", "fresh", "solid", "good")
NEGATIVE = ("bad", "dull", "broken", "cold", "dirty", "weak", "stale", "noisy", "cheap", "poor")
NEUTRAL = ("the", "was", "quite", "very", "and", "it", "really", "a", "bit", "so")
# Neutral for the gold reward, rewarded by the proxy: the spurious cue of task "proxy".
HYPE = ("very", "really", "so", "quite")
PROMPT_TEMPLATE = "Review of the {item}:"


@dataclass(frozen=True)
class SyntheticPair:
    prompt: str
    chosen: str
    rejected: str
    chosen_reward: float
    rejected_reward: float


def prompt_item(prompt: str) -> str | None:
    for item in ITEMS:
        if prompt.strip() == PROMPT_TEMPLATE.format(item=item):
            return item
    return None


def gold_reward(prompt: str, response: str) -> float:
    """The task's true reward of ``response`` to ``prompt`` (higher is better)."""
    words = response.replace(".", " ").replace(",", " ").split()
    item = prompt_item(prompt)
    score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    score += 1.0 if item is not None and item in words else 0.0
    score -= 0.5 * max(0, len(words) - 10)
    return float(score)


def proxy_reward(prompt: str, response: str) -> float:
    """The misspecified reward that labels task "proxy" (see the module docstring for the formula)."""
    words = response.replace(".", " ").replace(",", " ").split()
    item = prompt_item(prompt)
    score = sum(w in POSITIVE for w in words) - 0.5 * sum(w in NEGATIVE for w in words)
    score += 1.0 if item is not None and item in words else 0.0
    score += 1.0 * sum(w in HYPE for w in words) + 0.3 * len(words)
    return float(score)


Task = Literal["gold", "proxy"]
LABEL_REWARDS: dict[str, Callable[[str, str], float]] = {"gold": gold_reward, "proxy": proxy_reward}


def _random_response(rng: random.Random, item: str) -> str:
    # Each response has its own mood, so pairs differ in reward by varying amounts.
    p_pos, p_neg = rng.uniform(0.05, 0.6), rng.uniform(0.05, 0.6)
    words = []
    for _ in range(rng.randint(3, 9)):
        u = rng.random()
        pool = POSITIVE if u < p_pos else NEGATIVE if u < p_pos + p_neg else NEUTRAL
        words.append(rng.choice(pool))
    if rng.random() < 0.5:
        words.insert(rng.randint(0, len(words)), item)
    return " " + " ".join(words) + "."


def make_pairs(num_pairs: int, seed: int, task: Task = "gold") -> list[SyntheticPair]:
    """``num_pairs`` Bradley-Terry-labelled preference pairs; the same seed gives the same pairs.

    ``task`` picks the reward the labels are drawn from: ``"gold"`` (the default) or ``"proxy"``.
    Both consume the random stream identically, so one seed gives the same prompts and response
    pairs under either task and only the chosen/rejected order can differ."""
    if task not in LABEL_REWARDS:
        raise ValueError(f"task must be one of {sorted(LABEL_REWARDS)}, got {task!r}")
    label_reward = LABEL_REWARDS[task]
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < num_pairs:
        item = rng.choice(ITEMS)
        prompt = PROMPT_TEMPLATE.format(item=item)
        a, b = _random_response(rng, item), _random_response(rng, item)
        if a == b:
            continue
        ra, rb = gold_reward(prompt, a), gold_reward(prompt, b)
        la, lb = label_reward(prompt, a), label_reward(prompt, b)
        a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(la - lb)))
        if a_wins:
            pairs.append(SyntheticPair(prompt, a, b, ra, rb))
        else:
            pairs.append(SyntheticPair(prompt, b, a, rb, ra))
    return pairs


# ---------------------------------------------------------------------------------------------
# Length profiles: pairs whose token counts follow a long-tailed distribution, for the packing
# tests and the throughput benchmark (their content is noise; only the lengths matter).


@dataclass(frozen=True)
class LengthProfile:
    """Lognormal token counts, cut to the limits: ``median * exp(sigma * N(0, 1))``."""

    prompt_median: float
    prompt_sigma: float
    response_median: float
    response_sigma: float


# Anthropic-HH-like: dialogue prompts with a median of ~100 tokens, responses ~60, both with long
# tails (a tenth of the prompts over ~300 tokens, a few responses at the cut).
HH_LIKE = LengthProfile(prompt_median=100, prompt_sigma=0.9, response_median=60, response_sigma=0.8)


@dataclass(frozen=True)
class UniformLengths:
    """Token counts drawn uniformly from inclusive ranges, cut to the limits."""

    prompt: tuple[int, int]
    response: tuple[int, int]


# TL;DR-like: long, similar prompts (a post to summarise) and short responses (the summary).
TLDR_LIKE = UniformLengths(prompt=(350, 450), response=(20, 60))
# Every sequence of ~140-160 tokens: three fit a 512-token row, none is much longer than another.
MID_LENGTH = UniformLengths(prompt=(95, 105), response=(45, 55))


def length_profile_texts(num_pairs: int, seed: int, profile: LengthProfile | UniformLengths, max_prompt_tokens: int, max_response_tokens: int,
                         word: Callable[[random.Random], str], separator: str = "") -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` texts of ``word``s (one token each with a matching
    tokenizer: a letter for the byte tokenizer, ``"w123"`` for a word-level one) joined by
    ``separator``; responses start with the separator so they tokenize the same after a prompt."""
    rng = random.Random(seed)

    def count(part: str, limit: int) -> int:
        if isinstance(profile, UniformLengths):
            return max(1, min(limit, rng.randint(*getattr(profile, part))))
        median, sigma = getattr(profile, f"{part}_median"), getattr(profile, f"{part}_sigma")
        return max(1, min(limit, round(median * math.exp(sigma * rng.gauss(0.0, 1.0)))))

    def text(n: int) -> str:
        return separator.join(word(rng) for _ in range(n))

    rows = []
    for _ in range(num_pairs):
        prompt = text(count("prompt", max_prompt_tokens))
        chosen, rejected = (separator + text(count("response", max_response_tokens)) for _ in range(2))
        if chosen == rejected:
            rejected += separator + word(rng)
        rows.append((prompt, chosen, rejected))
    return rows
