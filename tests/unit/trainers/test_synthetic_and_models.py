import pytest
import torch

from trainers.config import ModelConfig, TinyModelConfig, TokenizerConfig
from trainers.model.build import ModelLoadError, build_policy, build_tokenizer, check_model_source, make_byte_tokenizer
from trainers.data.synthetic import gold_reward, make_pairs


def test_gold_reward_by_hand():
    """'great lamp fine bad' for the lamp: 2 positive - 1 negative + 1 (item) = 2."""
    assert gold_reward("Review of the lamp:", " great lamp fine bad.") == 2.0
    # 12 neutral words: 0 - 0.5 * (12 - 10) = -1
    assert gold_reward("Review of the lamp:", " " + " ".join(["the"] * 12)) == -1.0


def test_pairs_are_deterministic_and_follow_bradley_terry():
    a, b = make_pairs(400, seed=3), make_pairs(400, seed=3)
    assert a == b and make_pairs(50, seed=4) != a[:50]
    # The chosen response has the higher gold reward more often than not, but not always.
    agree = sum(p.chosen_reward > p.rejected_reward for p in a) / sum(p.chosen_reward != p.rejected_reward for p in a)
    assert 0.6 < agree < 0.98


def test_byte_tokenizer_round_trips_any_text():
    tok = make_byte_tokenizer()
    text = "Hello wörld \n\nHuman: ✓ tab\t"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(tok) == 259 and tok.pad_token_id == 0


def test_tiny_model_is_seeded_and_loads_back_through_from_pretrained(tmp_path):
    tok = make_byte_tokenizer()
    cfg = ModelConfig(tiny=TinyModelConfig(seed=5, tie_word_embeddings=True))
    m1, m2 = build_policy(cfg, tok), build_policy(cfg, tok)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    m1.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded_cfg = ModelConfig(name_or_path=str(tmp_path / "m"))
    check_model_source(loaded_cfg)
    loaded = build_policy(loaded_cfg, build_tokenizer(loaded_cfg, TokenizerConfig()))
    ids = torch.tensor([[1, 50, 60, 70]])
    assert torch.allclose(loaded(ids).logits, m1(ids).logits, atol=1e-6)


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="model.name_or_path: .* is not a model directory"):
        check_model_source(ModelConfig(name_or_path=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="tokenizer.kind"):
        build_tokenizer(ModelConfig(tiny=TinyModelConfig()), TokenizerConfig())


def test_uniform_length_profiles_stay_in_their_ranges():
    from trainers.data.synthetic import MID_LENGTH, TLDR_LIKE, length_profile_texts

    # One letter per token; responses start with the separator-free text, so a length is a string length.
    rows = length_profile_texts(200, 3, TLDR_LIKE, 450, 61, word=lambda rng: "a")
    prompts = [len(p) for p, _, _ in rows]
    responses = [len(r) for _, c, r0 in rows for r in (c, r0)]
    assert 350 <= min(prompts) and max(prompts) <= 450 and max(prompts) - min(prompts) > 50
    # A rejected response equal to the chosen one gets one word more (61 at most).
    assert 20 <= min(responses) and max(responses) <= 61
    totals = [len(p) + len(c) for p, c, _ in length_profile_texts(200, 3, MID_LENGTH, 256, 255, word=lambda rng: "a")]
    assert 140 <= min(totals) and max(totals) <= 160
    # A cut below the range applies: no prompt exceeds the limit.
    assert max(len(p) for p, _, _ in length_profile_texts(20, 3, TLDR_LIKE, 300, 61, word=lambda rng: "a")) == 300


def test_attention_implementation_reaches_the_model_or_names_the_field(tmp_path):
    import importlib.util

    from trainers.model.build import model_skeleton

    tok = make_byte_tokenizer()
    tiny = TinyModelConfig(hidden_size=32, intermediate_size=64, num_heads=2)
    assert build_policy(ModelConfig(tiny=tiny, attn_implementation="eager"), tok).config._attn_implementation == "eager"
    build_policy(ModelConfig(tiny=tiny), tok).save_pretrained(tmp_path / "m")
    saved = ModelConfig(name_or_path=str(tmp_path / "m"), attn_implementation="eager")
    assert build_policy(saved, tok).config._attn_implementation == "eager"
    assert model_skeleton(saved, tok).config._attn_implementation == "eager"  # the sharded path's modules
    assert build_policy(ModelConfig(name_or_path=str(tmp_path / "m")), tok).config._attn_implementation == "sdpa"
    if importlib.util.find_spec("flash_attn") is None:  # this machine: a clear line, not transformers' ImportError
        flash = saved.model_copy(update={"attn_implementation": "flash_attention_2"})
        for build in (build_policy, model_skeleton):
            with pytest.raises(ModelLoadError, match="model.attn_implementation: 'flash_attention_2' is not available"):
                build(flash, tok)
