"""The tokenized cache (trainers.data.token_cache through trainers.data.loading.load_pairs): a hit returns
exactly what tokenizing returns, with the same load reports; anything the pairs depend on changes
the key; data that can change under its name is never cached; a damaged entry is rebuilt."""

from __future__ import annotations

import json

import pytest

from trainers.data import loading as data_module
from trainers.data import token_cache
from trainers.config import DataConfig
from trainers.model.build import make_byte_tokenizer, make_word_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("TRDPO_TOKENIZED_CACHE", str(directory))
    return directory


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


ROWS = [{"prompt": "broken", "chosen": "same", "rejected": "same"}] + [
    {"prompt": f"question {i} " * (1 + i % 7), "chosen": f"good answer {i}", "rejected": f"bad answer {i} " * (i % 3 + 1)}
    for i in range(40)]


def config(path, **extra) -> DataConfig:
    return DataConfig(format="preference", path=str(path), max_length=32, max_prompt_length=12, on_bad_row="skip", **extra)


def tokenizer():
    return make_byte_tokenizer()


def test_a_hit_returns_the_tokenized_pairs_and_reports_exactly(cache, tmp_path, capsys, monkeypatch):
    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    cold = data_module.load_pairs(config(path), tokenizer(), rank=0)
    said_cold = capsys.readouterr().out
    assert len(list(cache.glob("*.npz"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit tokenized")

    monkeypatch.setattr(data_module, "tokenize_examples", no_tokenizing)
    warm = data_module.load_pairs(config(path), tokenizer(), rank=0)
    said_warm = capsys.readouterr().out
    assert warm == cold and len(cold[0]) > 0 and len(cold[1]) > 0
    assert "tokenized pairs from the cache" in said_warm
    # The same read/kept/skipped/truncated lines, the identical pair counted as skipped.
    reports = [line for line in said_cold.splitlines() if line.startswith(("[trdpo] train:", "[trdpo] validation:"))]
    assert reports and all(line in said_warm for line in reports)
    assert "skipped: 1 chosen and rejected are identical" in said_warm


def test_whatever_the_pairs_depend_on_changes_the_key(cache, tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    base = token_cache.cache_key(config(path), tokenizer())
    assert base == token_cache.cache_key(config(path), tokenizer())
    assert base != token_cache.cache_key(config(path, validation_fraction=0.2), tokenizer())
    assert base != token_cache.cache_key(DataConfig(**{**config(path).model_dump(), "max_length": 31}), tokenizer())
    assert token_cache.cache_key(config(path), make_word_tokenizer(300)) != token_cache.cache_key(config(path), make_word_tokenizer(301))
    renamed_eos = make_byte_tokenizer()
    renamed_eos.eos_token = "<pad>"
    assert base != token_cache.cache_key(config(path), renamed_eos)
    write_rows(path, ROWS[:-1])  # the same path, other content
    assert base != token_cache.cache_key(config(path), tokenizer())


def test_a_hugging_face_dataset_is_never_cached_and_off_turns_it_off(cache, tmp_path, monkeypatch):
    hub = DataConfig(format="hh_rlhf", hf_dataset="Anthropic/hh-rlhf", max_length=32, max_prompt_length=12)
    assert token_cache.cache_key(hub, tokenizer()) is None  # it can change upstream under the same name
    monkeypatch.setenv("TRDPO_TOKENIZED_CACHE", "off")
    assert token_cache.cache_dir() is None
    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    data_module.load_pairs(config(path), tokenizer(), rank=0)
    assert not cache.exists()


def test_a_damaged_entry_is_tokenized_again_and_rewritten(cache, tmp_path, capsys):
    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    cold = data_module.load_pairs(config(path), tokenizer(), rank=0)
    entry = next(cache.glob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:100])
    capsys.readouterr()
    again = data_module.load_pairs(config(path), tokenizer(), rank=0)
    assert again == cold and "unreadable" in capsys.readouterr().out
    assert data_module.load_pairs(config(path), tokenizer(), rank=0) == cold
    assert "tokenized pairs from the cache" in capsys.readouterr().out


def test_a_missing_data_file_is_still_the_loaders_one_line_error(cache, tmp_path):
    from trainers.data.types import DataError

    path = write_rows(tmp_path / "pairs.jsonl", ROWS)
    assert token_cache.cache_key(config(path, validation_path=str(tmp_path / "missing.jsonl")), tokenizer()) is None
    with pytest.raises(DataError):
        data_module.load_pairs(config(path, validation_path=str(tmp_path / "missing.jsonl")), tokenizer(), rank=0)
