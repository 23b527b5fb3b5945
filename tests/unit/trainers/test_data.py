import json
from pathlib import Path

import pandas as pd
import pytest

from trainers.config import DataConfig
from trainers.data.loading import load_examples, read_hf_rows, tokenize_examples, tokenize_pair
from trainers.data.types import DataError, LoadReport, PreferenceExample
from trainers.data.batching import collate_pairs
from trainers.model.build import make_byte_tokenizer
from trainers.trdpo import IGNORE_INDEX

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


def cfg(**kw) -> DataConfig:
    kw.setdefault("validation_fraction", 0.0)
    return DataConfig(**kw)


def test_hh_rlhf_single_and_multi_turn():
    examples, report = load_examples(cfg(format="hh_rlhf", path=str(FIXTURES / "hh_rlhf.jsonl")))
    assert report.kept == 3 and not report.skipped
    first, multi = examples[0], examples[1]
    assert first.prompt == "\n\nHuman: What is a good name for a cat?\n\nAssistant:"
    assert first.chosen == " Whiskers is a classic choice." and first.rejected == " I don't care about cats."
    # Multi-turn: the prompt holds the whole conversation up to the *last* assistant turn.
    assert multi.prompt.endswith("\n\nHuman: For how long?\n\nAssistant:")
    assert "Put it in boiling water." in multi.prompt
    assert multi.chosen == " About nine minutes for a hard yolk." and multi.rejected == " Forever."


def test_tldr_comparisons_follow_the_choice():
    examples, _ = load_examples(cfg(format="tldr", path=str(FIXTURES / "tldr_comparisons.jsonl")))
    assert examples[0].prompt.startswith("SUBREDDIT: r/dogs\nTITLE: Dog chews shoes\nPOST: I adopted")
    assert examples[0].prompt.endswith("TL;DR:")
    assert examples[0].chosen == " My new dog chews my shoes; how to stop it?" and examples[0].rejected == " dog"
    assert examples[1].chosen.startswith(" Roommate never cleans") and examples[1].rejected == " kitchen"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", ".json"])
def test_generic_formats_give_the_same_examples(tmp_path, suffix):
    rows = [json.loads(line) for line in (FIXTURES / "preference.jsonl").read_text().splitlines()]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path = FIXTURES / "preference.jsonl"
    elif suffix == ".csv":
        path = FIXTURES / "preference.csv"
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text(json.dumps(rows))
    examples, _ = load_examples(cfg(format="preference", path=str(path)))
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def test_conversational_rows_explicit_and_implicit_prompt(tokenizer, tmp_path):
    examples, _ = load_examples(cfg(format="preference", path=str(FIXTURES / "conversational.jsonl")))
    explicit, implicit = examples
    assert explicit.prompt == [{"role": "user", "content": "Hi!"}]
    assert implicit.prompt == [{"role": "user", "content": "Name a colour."}]
    assert implicit.chosen == [{"role": "assistant", "content": "Blue."}]
    pair = tokenize_pair(explicit, tokenizer, cfg(format="synthetic"))
    assert tokenizer.decode(pair.prompt_ids, skip_special_tokens=True) == "<|user|>\nHi!\n<|assistant|>\n"
    assert tokenizer.decode(pair.chosen_ids, skip_special_tokens=True) == "Hello, how can I help?\n"
    # The same rows through parquet (lists of structs come back as numpy arrays) parse the same.
    rows = [json.loads(line) for line in (FIXTURES / "conversational.jsonl").read_text().splitlines()]
    pd.DataFrame(rows[:1]).to_parquet(tmp_path / "c.parquet")
    again, _ = load_examples(cfg(format="preference", path=str(tmp_path / "c.parquet")))
    assert again[0].prompt == explicit.prompt and again[0].chosen == explicit.chosen


def test_hugging_face_dataset_through_load_dataset(tmp_path):
    """A local dataset directory goes through datasets.load_dataset exactly like a Hub name."""
    repo = tmp_path / "my-hh"
    (repo / "data").mkdir(parents=True)
    lines = (FIXTURES / "hh_rlhf.jsonl").read_text()
    (repo / "data" / "train.jsonl").write_text(lines)
    (repo / "data" / "test.jsonl").write_text(lines.splitlines()[0] + "\n")
    config = cfg(format="hh_rlhf", hf_dataset=str(repo), validation_split="test")
    train, report = load_examples(config, "train")
    validation, _ = load_examples(config, "validation")
    assert len(train) == 3 and len(validation) == 1
    assert report.source == f"{repo}[train]"
    with pytest.raises(DataError, match="hf_dataset .*cannot load"):
        list(read_hf_rows(str(tmp_path / "missing"), "train"))


BAD_ROWS = [
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "p", "rejected": "b"}, "missing field 'chosen'"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "field 'rejected' is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string, got int"),
    ({"prompt": "   ", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
    ({"chosen": [{"role": "user"}], "rejected": [{"role": "assistant", "content": "x"}]}, "field 'chosen' message 0 must be"),
    ([1, 2, 3], "expected an object with fields, got list"),
    ("{not json", "not valid JSON"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_rows_name_file_and_row_or_are_counted(tmp_path, row, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = tmp_path / "d.jsonl"
    bad_line = row if isinstance(row, str) else json.dumps(row)
    path.write_text(json.dumps(good) + "\n" + bad_line + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError) as info:
        load_examples(cfg(format="preference", path=str(path)))
    assert str(info.value).startswith(f"{path}, row 2: {message}")
    examples, report = load_examples(cfg(format="preference", path=str(path), on_bad_row="skip"))
    assert len(examples) == 2 and report.rows_read == 3 and sum(report.skipped.values()) == 1
    assert message in next(iter(report.skipped))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"}, "field 'chosen' has no"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "chosen and rejected transcripts differ before the last assistant turn"),
    ],
)
def test_bad_hh_rows(tmp_path, row, message):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_examples(cfg(format="hh_rlhf", path=str(path)))
    assert f"{path}, row 1: {message}" in str(info.value)


def test_bad_tldr_choice(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"info": {"post": "x"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 2}) + "\n")
    with pytest.raises(DataError, match="row 1: field 'choice' must be 0 or 1, got 2"):
        load_examples(cfg(format="tldr", path=str(path)))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(cfg(format="preference", path=str(tmp_path / "absent.jsonl")))


def test_truncation_keeps_the_end_of_the_prompt_and_the_response(tokenizer):
    config = cfg(format="synthetic", max_length=20, max_prompt_length=8)
    example = PreferenceExample("0123456789ABCDEF", " yes", " no", row=1)
    report = LoadReport("x")
    pair = tokenize_pair(example, tokenizer, config, report)
    assert tokenizer.decode(pair.prompt_ids) == "89ABCDEF"  # the start went
    assert tokenizer.decode(pair.chosen_ids) == " yes</s>"
    assert report.prompts_truncated == 1
    long = PreferenceExample("hi", " " + "x" * 40, " " + "y" * 40, row=2)
    pair = tokenize_pair(long, tokenizer, config, report)
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 20 and report.responses_truncated == 2


def test_prompt_over_budget_is_a_bad_row_in_error_mode(tokenizer):
    config = cfg(format="synthetic", max_length=20, max_prompt_length=8, prompt_truncation="error")
    examples = [PreferenceExample("0123456789ABCDEF", " yes", " no", row=7)]
    with pytest.raises(DataError, match=r"src, row 7: prompt has 16 tokens, over max_prompt_length=8"):
        tokenize_examples(examples, tokenizer, config, "src", LoadReport("src", kept=1))
    skipping = cfg(format="synthetic", max_length=20, max_prompt_length=8, prompt_truncation="error", on_bad_row="skip")
    report = LoadReport("src", kept=1)
    assert tokenize_examples(examples, tokenizer, skipping, "src", report) == [] and report.kept == 0


def test_collation_masks_prompt_and_padding(tokenizer):
    config = cfg(format="synthetic")
    pairs = [
        tokenize_pair(PreferenceExample("ab", " c", " dd", 1), tokenizer, config),
        tokenize_pair(PreferenceExample("abc", " eee", " f", 2), tokenizer, config),
    ]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch.input_ids.shape == (4, 3 + 5) and batch.num_pairs == 2
    # Row 0 = pair 0 chosen: a b | ' ' c EOS | pad pad pad
    assert batch.labels[0].tolist()[:2] == [IGNORE_INDEX] * 2
    assert tokenizer.decode([t for t in batch.labels[0].tolist() if t != IGNORE_INDEX]) == " c</s>"
    assert batch.attention_mask[0].tolist() == [1] * 5 + [0] * 3
    # Row 2 = pair 0 rejected, row 3 = pair 1 rejected.
    assert tokenizer.decode([t for t in batch.labels[3].tolist() if t != IGNORE_INDEX]) == " f</s>"
    sft = collate_pairs(pairs, tokenizer.pad_token_id, chosen_only=True)
    assert sft.input_ids.shape[0] == 2


def test_synthetic_split_and_max_examples():
    config = DataConfig(format="synthetic", validation_fraction=0.1, max_examples=50)
    train, _ = load_examples(config, "train")
    validation, _ = load_examples(config, "validation")
    assert len(train) == 50 and len(validation) == 200
    assert {e.row for e in train}.isdisjoint({e.row for e in validation})


def test_a_response_already_ending_with_eos_gets_no_second_one():
    # TRL appends EOS only when the response does not already end with it; so do we. Before the
    # fix, " yes</s>" became " yes" EOS EOS: one more token than TRL scores.
    tokenizer = make_byte_tokenizer()
    config = cfg(format="synthetic")
    eos = tokenizer.eos_token_id
    plain = tokenize_pair(PreferenceExample("q", " yes", " no", 1), tokenizer, config)
    ended = tokenize_pair(PreferenceExample("q", " yes</s>", " no</s>", 1), tokenizer, config)
    assert ended.chosen_ids == plain.chosen_ids and ended.rejected_ids == plain.rejected_ids
    assert ended.chosen_ids[-1] == eos and ended.chosen_ids[-2] != eos
    # A chat template that closes assistant turns with the EOS text: still exactly one EOS.
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% else %}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    chat = tokenize_pair(PreferenceExample([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "yes"}],
                                           [{"role": "assistant", "content": "no"}], 2), tokenizer, config)
    assert tokenizer.decode(chat.chosen_ids) == "yes</s>" and chat.chosen_ids.count(eos) == 1


def test_invalid_utf8_on_one_jsonl_line_is_one_bad_row(tmp_path):
    # The line is a bad row like any other (on_bad_row=skip skips it), not a refusal of the whole
    # file ("cannot read ... codec can't decode") that names no row.
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n' + good + b"\n")
    with pytest.raises(DataError) as info:
        load_examples(cfg(format="preference", path=str(path)))
    assert str(info.value).startswith(f"{path}, row 2: not valid UTF-8 (byte 0xe9 at byte 16 of the line)")
    examples, report = load_examples(cfg(format="preference", path=str(path), on_bad_row="skip"))
    # The BOM on line 1 is not a bad row; the rows keep their file positions.
    assert [e.row for e in examples] == [1, 3] and report.rows_read == 3
    assert list(report.skipped) == ["not valid UTF-8 (byte 0xe9 at byte 16 of the line)"]


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_invalid_utf8_in_a_json_or_csv_file_names_file_line_and_byte(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_bytes(b'[{"prompt": "p", "chosen": "a", "rejected": "b"},\n {"prompt": "\xff", "chosen": "a", "rejected": "b"}]\n')
    else:
        path.write_bytes(b"prompt,chosen,rejected\np,a,b\n\xffq,a,b\n")
    with pytest.raises(DataError) as info:
        load_examples(cfg(format="preference", path=str(path), on_bad_row="skip"))
    where = "line 2, byte 14" if suffix == ".json" else "line 3, byte 1"
    assert str(info.value) == f"{path}: not valid UTF-8 at {where} of the line (0xff); re-save the file as UTF-8"
