"""Task "proxy" of the synthetic data: labels from a misspecified reward, default task untouched."""

import hashlib

import pytest

from trainers.data.synthetic import gold_reward, make_pairs, proxy_reward

LAMP = "Review of the lamp:"


def test_default_task_output_is_unchanged():
    """The digest was taken from make_pairs before task 'proxy' existed (git HEAD 5741820)."""
    digest = hashlib.sha256(repr(make_pairs(300, seed=7)).encode()).hexdigest()
    assert digest == "323c41563715dd73728ce573a7cff9c4ba60569b583b31f38003e0a1fff627b8"
    assert make_pairs(300, seed=7, task="gold") == make_pairs(300, seed=7)


def test_proxy_reward_by_hand():
    """' really great lamp bad.': 1 positive - 0.5*1 negative + 1 item + 1.0*1 hype + 0.3*4 words = 3.7."""
    assert proxy_reward(LAMP, " really great lamp bad.") == pytest.approx(3.7)
    # Gold ignores the hype word and the length: 1 - 1 + 1 = 1.
    assert gold_reward(LAMP, " really great lamp bad.") == 1.0


def test_proxy_labels_agree_with_gold_less_on_the_same_pairs():
    gold, proxy = make_pairs(4000, seed=0), make_pairs(4000, seed=0, task="proxy")
    # Same random stream: the same prompts and response pairs, only the labels differ.
    assert [(p.prompt, {p.chosen, p.rejected}) for p in gold] == [(p.prompt, {p.chosen, p.rejected}) for p in proxy]
    assert any(g.chosen != p.chosen for g, p in zip(gold, proxy))

    def agreement(pairs):
        decided = [p for p in pairs if p.chosen_reward != p.rejected_reward]
        return sum(p.chosen_reward > p.rejected_reward for p in decided) / len(decided)

    # Measured: gold 0.886, proxy 0.778 (chosen_reward stays the gold reward under both tasks).
    assert agreement(gold) > 0.85
    assert agreement(proxy) < agreement(gold) - 0.07


def test_over_optimising_the_proxy_lowers_the_gold_reward():
    good = " great lamp fine superb."
    # 13 words: 11 hype words, 'great' and the item.
    stuffed = " really very great lamp so really quite very really so very really so."
    # gold:  good = 3 + 1 = 4;            stuffed = 1 + 1 - 0.5 * (13 - 10) = 0.5
    # proxy: good = 3 + 1 + 0.3 * 4 = 5.2; stuffed = 1 + 1 + 11 + 0.3 * 13 = 16.9
    assert (gold_reward(LAMP, good), gold_reward(LAMP, stuffed)) == (4.0, 0.5)
    assert proxy_reward(LAMP, good) == pytest.approx(5.2)
    assert proxy_reward(LAMP, stuffed) == pytest.approx(16.9)


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="task must be one of .*'gold', 'proxy'.*got 'bogus'"):
        make_pairs(5, seed=0, task="bogus")
