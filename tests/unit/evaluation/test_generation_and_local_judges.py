"""Generation and the local judges (hf, reward_model, python) on real tiny models."""

from __future__ import annotations

import asyncio

import pytest
import torch

from evaluation.config import JudgeConfig, SamplingConfig
from evaluation.generation import generate, load_policy
from evaluation.judges import HFJudge, PythonScorer, RewardModelScorer
from evaluation.protocol import Item, judge_items
from trainers.config import TinyModelConfig
from trainers.model.build import build_tiny_model, make_byte_tokenizer


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    tokenizer = make_byte_tokenizer()
    build_tiny_model(TinyModelConfig(seed=3), len(tokenizer), tokenizer.pad_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load_policy(str(path))


def test_generation_is_deterministic_batched_and_counts_samples(tiny_policy):
    model, tokenizer = tiny_policy
    prompts = [(f"p{i}", f"Review of the lamp number {i}:" if i % 2 else "Hi") for i in range(5)]
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, num_samples=2, batch_size=2, seed=7)
    first = generate(model, tokenizer, prompts, cfg)
    again = generate(model, tokenizer, prompts, cfg)
    assert [s.response for s in first] == [s.response for s in again]
    assert len(first) == 10 and [(s.prompt_id, s.sample_index) for s in first[:4]] == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)]
    assert all(0 < s.num_tokens <= 12 and s.mean_entropy > 0 for s in first)
    other_seed = generate(model, tokenizer, prompts, cfg.model_copy(update={"seed": 8}))
    assert [s.response for s in other_seed] != [s.response for s in first]


def test_greedy_batched_equals_one_at_a_time(tiny_policy):
    """Left padding must not change what a prompt generates."""
    model, tokenizer = tiny_policy
    prompts = [("a", "Review of the chair:"), ("b", "x"), ("c", "A much longer prompt than the others here:")]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=8, batch_size=3)
    batched = generate(model, tokenizer, prompts, cfg)
    single = [generate(model, tokenizer, [p], cfg, batch_size=1)[0] for p in prompts]
    assert [s.response for s in batched] == [s.response for s in single]


def test_hf_judge_reads_a_and_b_logprobs(tiny_policy):
    model, tokenizer = tiny_policy
    judge = HFJudge(JudgeConfig(backend="hf", model="tiny-local", template="hh"), model=model, tokenizer=tokenizer)
    result = asyncio.run(judge.judge("Question?", "first answer", "second answer"))
    assert result.verdict in {"A", "B"} and '"A"' in result.raw_output and result.attempts == 1
    swapped = asyncio.run(judge.judge("Question?", "second answer", "first answer"))
    assert swapped.verdict in {"A", "B"}  # a real model, real logits; both orders produce verdicts


def test_score_judges_python_and_reward_model():
    gold = PythonScorer(JudgeConfig(backend="python", function="trainers.data.synthetic:gold_reward"))
    items = [Item("1", "Review of the lamp:", " great lamp.", " bad."), Item("2", "Review of the lamp:", " bad.", " fine lamp.")]
    results = asyncio.run(judge_items(gold, items))
    assert [r.outcome for r in results] == ["win", "loss"] and results[0].policy_score == 2.0
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = make_byte_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0))
    scorer = RewardModelScorer(JudgeConfig(backend="reward_model", model="tiny-rm"), model=rm, tokenizer=tokenizer)
    scored = asyncio.run(judge_items(scorer, items))
    assert all(isinstance(r.policy_score, float) and r.outcome in {"win", "loss", "tie"} for r in scored)
    broken = PythonScorer(JudgeConfig(backend="python", function="math:log"))  # log(prompt, response) raises TypeError
    failed = asyncio.run(judge_items(broken, items[:1]))
    assert failed[0].outcome == "api_error" and "TypeError" in failed[0].errors[0]
