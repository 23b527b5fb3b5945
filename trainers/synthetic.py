"""The bundled synthetic preference task: offline, deterministic, with a known gold reward.

Prompts ask for a short review of an item (``"Review of the lamp:"``). Responses are short word
sequences; the gold reward prefers positive words, penalises negative ones, rewards naming the item
and penalises rambling past ten words:

    gold_reward = #positive - #negative + 1[item named] - 0.5 * max(0, #words - 10)

Pairs are two random responses to one prompt, and which one is "chosen" is drawn from the
Bradley-Terry model on the gold reward, P(a > b) = sigmoid(r_a - r_b): noisy, like human labels.
Because the reward is code, the python judge can score trained policies exactly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

ITEMS = (
    "lamp", "chair", "kettle", "bike", "phone", "book", "tent", "jacket", "camera", "clock",
    "desk", "radio", "watch", "boots", "piano", "sofa", "scarf", "oven", "drill", "mug",
)
POSITIVE = ("great", "lovely", "superb", "fine", "bright", "warm", "clean", "fresh", "solid", "good")
NEGATIVE = ("bad", "dull", "broken", "cold", "dirty", "weak", "stale", "noisy", "cheap", "poor")
NEUTRAL = ("the", "was", "quite", "very", "and", "it", "really", "a", "bit", "so")
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


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [PROMPT_TEMPLATE.format(item=rng.choice(ITEMS)) for _ in range(n)]


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


def make_pairs(num_pairs: int, seed: int) -> list[SyntheticPair]:
    """``num_pairs`` Bradley-Terry-labelled preference pairs; the same seed gives the same pairs."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < num_pairs:
        item = rng.choice(ITEMS)
        prompt = PROMPT_TEMPLATE.format(item=item)
        a, b = _random_response(rng, item), _random_response(rng, item)
        if a == b:
            continue
        ra, rb = gold_reward(prompt, a), gold_reward(prompt, b)
        a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(ra - rb)))
        if a_wins:
            pairs.append(SyntheticPair(prompt, a, b, ra, rb))
        else:
            pairs.append(SyntheticPair(prompt, b, a, rb, ra))
    return pairs
