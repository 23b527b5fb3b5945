"""Preference data: read rows in their real formats, check them, tokenize and collate.

    rows (file / Hugging Face dataset / synthetic)
      └─ parse_row[format]  ──►  PreferenceExample(prompt, chosen, rejected)   (bad rows named)
           └─ tokenize_pair  ──►  TokenizedPair(prompt_ids, chosen_ids, rejected_ids)
                └─ (trainers.data.batching: data order, micro-batches, packed or padded rows)

Formats:
* ``preference``: ``prompt``/``chosen``/``rejected`` strings, or chat messages
  (``[{"role", "content"}]``) rendered with the tokenizer's chat template; without ``prompt`` the
  shared leading messages of chosen and rejected are the prompt (the "implicit prompt" form).
* ``hh_rlhf``: Anthropic HH full transcripts; the prompt is the shared prefix up to and including
  the last ``"\\n\\nAssistant:"``.
* ``tldr``: OpenAI summarize-from-feedback comparisons (``info``, ``summaries``, ``choice``).
* ``synthetic``: the bundled task in :mod:`trainers.data.synthetic`.

A bad row either stops loading with a message naming source and row, or (``on_bad_row: skip``) is
dropped and counted in the :class:`LoadReport`; nothing is dropped silently.
"""

from __future__ import annotations

import codecs
import json
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from trainers.config import DataConfig
from trainers.data import token_cache
from trainers.data.types import BadRow, DataError, LoadReport, Messages, PreferenceExample, Text, TokenizedPair

HH_ASSISTANT = "\n\nAssistant:"
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


# ---------------------------------------------------------------------------------------------
# Row parsing, one function per format. Each returns (prompt, chosen, rejected) or raises BadRow.


def _require_text(row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise BadRow(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _check_messages(value: Any, key: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise BadRow(f"field '{key}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise BadRow(f"field '{key}' message {i} must be {{'role': str, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_responses(chosen: Text, rejected: Text) -> None:
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        text = value if isinstance(value, str) else "".join(m["content"] for m in value)
        if not text.strip():
            raise BadRow(f"field '{name}' is empty")
    if chosen == rejected:
        raise BadRow("chosen and rejected are identical")


def parse_preference_row(row: dict) -> tuple[Text, Text, Text]:
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise BadRow(f"missing field '{key}'")
    if isinstance(row["chosen"], list) or isinstance(row["rejected"], list):
        chosen, rejected = _check_messages(row["chosen"], "chosen"), _check_messages(row["rejected"], "rejected")
        if row.get("prompt") is not None:
            prompt = row["prompt"]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_messages(prompt, "prompt")
        else:
            # Implicit prompt: the leading messages both conversations share.
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            if shared == 0:
                raise BadRow("conversations share no prompt messages and no 'prompt' field is given")
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        _check_responses(chosen, rejected)
        return prompt, chosen, rejected
    prompt = _require_text(row, "prompt")
    chosen, rejected = _require_text(row, "chosen"), _require_text(row, "rejected")
    if not prompt.strip():
        raise BadRow("field 'prompt' is empty")
    _check_responses(chosen, rejected)
    return prompt, chosen, rejected


def parse_hh_row(row: dict) -> tuple[Text, Text, Text]:
    chosen_full, rejected_full = _require_text(row, "chosen"), _require_text(row, "rejected")
    cut = chosen_full.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow("field 'chosen' has no '\\n\\nAssistant:' turn")
    prompt = chosen_full[: cut + len(HH_ASSISTANT)]
    if not rejected_full.startswith(prompt):
        raise BadRow("chosen and rejected transcripts differ before the last assistant turn")
    if "\n\nHuman:" not in prompt:
        raise BadRow("the prompt has no '\\n\\nHuman:' turn")
    chosen, rejected = chosen_full[len(prompt):], rejected_full[len(prompt):]
    _check_responses(chosen, rejected)
    return prompt, chosen, rejected


def parse_tldr_row(row: dict) -> tuple[Text, Text, Text]:
    info, summaries, choice = row.get("info"), row.get("summaries"), row.get("choice")
    if not isinstance(info, dict):
        raise BadRow("missing field 'info' (post, title, subreddit)")
    post = info.get("post") or info.get("article")
    if not isinstance(post, str) or not post.strip():
        raise BadRow("field 'info.post' is missing or empty")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise BadRow("field 'summaries' must hold exactly two summaries")
    texts = [s.get("text") if isinstance(s, dict) else None for s in summaries]
    if not all(isinstance(t, str) for t in texts):
        raise BadRow("each summary needs a string 'text'")
    if choice not in (0, 1):
        raise BadRow(f"field 'choice' must be 0 or 1, got {choice!r}")
    prompt = TLDR_TEMPLATE.format(
        subreddit=info.get("subreddit") or "unknown", title=info.get("title") or "", post=post.strip()
    )
    chosen, rejected = " " + texts[choice].strip(), " " + texts[1 - choice].strip()
    _check_responses(chosen, rejected)
    return prompt, chosen, rejected


ROW_PARSERS: dict[str, Callable[[dict], tuple[Text, Text, Text]]] = {
    "preference": parse_preference_row,
    "hh_rlhf": parse_hh_row,
    "tldr": parse_tldr_row,
}


# ---------------------------------------------------------------------------------------------
# Sources: local files, Hugging Face datasets, the synthetic task. Each yields (row_number, row).


def read_file_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Rows of a .jsonl/.json/.parquet/.csv file, numbered from 1. Undecodable rows come back as
    ``BadRow`` instances so that the caller decides whether they stop the load.

    A .jsonl file is decoded line by line, so one line of invalid UTF-8 is one bad row (named, or
    skipped and counted) rather than the whole file refused. A .json or .csv file is one document
    (CSV fields may span lines), so invalid UTF-8 there is an error naming the file, line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    if number == 1:  # editors on Windows write a BOM, which json refuses
                        raw = raw.removeprefix(codecs.BOM_UTF8)
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        yield number, BadRow(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)")
                        continue
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield number, BadRow(f"not valid JSON ({exc.msg} at column {exc.colno})")
                        continue
                    yield number, row
            return
        if suffix == ".json":
            rows = json.loads(_read_utf8(path))
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json file must hold a list of rows")
        elif suffix in {".parquet", ".csv"}:
            import io

            import pandas as pd

            if suffix == ".parquet":
                frame = pd.read_parquet(path)
            else:
                frame = pd.read_csv(io.StringIO(_read_utf8(path)), keep_default_na=False)
            rows = [_plain(r) for r in frame.to_dict(orient="records")]
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .csv")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read ({exc})") from exc
    yield from enumerate(rows, start=1)


def _read_utf8(path: Path) -> str:
    """The whole file as text, or a DataError naming the line and column of the first invalid byte."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}: not valid UTF-8 at line {line}, byte {column} of the line (0x{data[exc.start]:02x}); "
                        f"re-save the file as UTF-8") from None


def _plain(value: Any) -> Any:
    """numpy arrays and scalars from pandas → lists and Python scalars (so messages parse)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def read_hf_rows(name: str, split: str, config_name: str | None = None, data_dir: str | None = None) -> Iterator[tuple[int, Any]]:
    """Rows of a Hugging Face dataset (Hub name or local dataset directory), numbered from 1."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config_name, data_dir=data_dir, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise DataError(f"hf_dataset {name!r} (split {split!r}): cannot load ({type(exc).__name__}: {exc})") from exc
    for number, row in enumerate(dataset, start=1):
        yield number, row


def synthetic_examples(num_pairs: int, seed: int, task: str = "gold") -> list[PreferenceExample]:
    from trainers.data.synthetic import make_pairs

    pairs = make_pairs(num_pairs, seed, task=task)
    return [PreferenceExample(p.prompt, p.chosen, p.rejected, row=i) for i, p in enumerate(pairs, 1)]


def parse_rows(
    rows: Iterable[tuple[int, Any]], data_format: str, source: str, on_bad_row: str, report: LoadReport
) -> list[PreferenceExample]:
    parser = ROW_PARSERS[data_format]
    examples = []
    for number, row in rows:
        report.rows_read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            if not isinstance(row, dict):
                raise BadRow(f"expected an object with fields, got {type(row).__name__}")
            prompt, chosen, rejected = parser(row)
        except BadRow as bad:
            if on_bad_row == "error":
                raise DataError(f"{source}, row {number}: {bad} (set data.on_bad_row=skip to skip such rows)") from None
            report.skipped[str(bad)] += 1
            continue
        examples.append(PreferenceExample(prompt, chosen, rejected, number))
        report.kept += 1
    return examples


def load_examples(cfg: DataConfig, split: str = "train") -> tuple[list[PreferenceExample], LoadReport]:
    """Parse one split (``train`` or ``validation``) of the configured data.

    Validation comes from ``validation_path``/``validation_split`` when given, else the last
    ``validation_fraction`` of the parsed training rows (a fixed, seed-independent tail).
    """
    if split not in {"train", "validation"}:
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if cfg.format == "synthetic":
        examples = synthetic_examples(cfg.synthetic.num_pairs, cfg.synthetic.seed, cfg.synthetic.task)
        report = LoadReport("synthetic", rows_read=len(examples), kept=len(examples))
        return _select(examples, cfg, split), report
    explicit_validation = cfg.validation_path or cfg.validation_split
    if split == "validation" and explicit_validation:
        source, rows = _rows_of(cfg.validation_path, cfg.validation_split, cfg)
        report = LoadReport(source)
        return parse_rows(rows, cfg.format, source, cfg.on_bad_row, report), report
    source, rows = _rows_of(cfg.path, cfg.train_split, cfg)
    report = LoadReport(source)
    examples = parse_rows(rows, cfg.format, source, cfg.on_bad_row, report)
    if not examples:
        raise DataError(f"{source}: no usable rows ({report.summary()})")
    if explicit_validation:  # nothing to carve out: all parsed rows train
        return examples[: cfg.max_examples] if cfg.max_examples else examples, report
    return _select(examples, cfg, split), report


def _rows_of(path: str | None, hf_split: str, cfg: DataConfig) -> tuple[str, Iterator[tuple[int, Any]]]:
    """A local file when ``path`` is set, else the ``hf_split`` of the configured HF dataset."""
    if path:
        return path, read_file_rows(path)
    return f"{cfg.hf_dataset}[{hf_split}]", read_hf_rows(cfg.hf_dataset, hf_split, cfg.hf_config, cfg.hf_data_dir)


def _select(examples: list[PreferenceExample], cfg: DataConfig, split: str) -> list[PreferenceExample]:
    n_val = int(round(len(examples) * cfg.validation_fraction))
    if cfg.validation_fraction > 0:
        n_val = max(n_val, 1)
    train, validation = examples[: len(examples) - n_val], examples[len(examples) - n_val :]
    if split == "train" and cfg.max_examples:
        train = train[: cfg.max_examples]
    return train if split == "train" else validation


# ---------------------------------------------------------------------------------------------
# Tokenization and collation.


def render(tokenizer, prompt: Text, response: Text) -> tuple[str, str]:
    """Prompt and response as plain text; chat messages go through the chat template."""
    if isinstance(prompt, str) and isinstance(response, str):
        return prompt, response
    if getattr(tokenizer, "chat_template", None) is None:
        raise BadRow("conversational rows need a tokenizer with a chat template (set tokenizer.chat_template)")
    prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    response_msgs = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
    prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt_msgs + response_msgs, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise BadRow("the chat template renders the prompt differently inside the full conversation")
    return prompt_text, full_text[len(prompt_text):]


def _encode(tokenizer, text: str, special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])


def _response_ids(tokenizer, text: str) -> list[int]:
    """A response's ids ending in exactly one EOS. Data (and chat templates) often already end a
    response with the EOS text; TRL then adds none, and a second EOS would teach the model to emit
    EOS twice and shift every log-prob comparison with TRL by one token. Stripping the text and
    appending the id (rather than trusting the tokenizer to map the text) gives one real EOS even
    with tokenizers that split special-token text into pieces."""
    eos_id, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    if eos_id is None:
        return _encode(tokenizer, text)
    if eos_text and text.endswith(eos_text):
        text = text[: -len(eos_text)]
    return _encode(tokenizer, text) + [eos_id]


def tokenize_pair(example: PreferenceExample, tokenizer, cfg: DataConfig, report: LoadReport | None = None) -> TokenizedPair:
    """Token ids with the response kept: an over-long prompt loses its *start* (the end carries the
    question), then responses are cut to fit ``max_length``. Responses end with one EOS (none is
    added when the response text already ends with it, as in TRL)."""
    prompt_text, chosen_text = render(tokenizer, example.prompt, example.chosen)
    _, rejected_text = render(tokenizer, example.prompt, example.rejected)
    # Plain prompts get the tokenizer's own special tokens (a BOS for Llama, none for Pythia);
    # chat templates already write theirs. Responses never get any but the closing EOS.
    prompt_ids = _encode(tokenizer, prompt_text, special_tokens=isinstance(example.prompt, str))
    if len(prompt_ids) > cfg.max_prompt_length:
        if cfg.prompt_truncation == "error":
            raise BadRow(f"prompt has {len(prompt_ids)} tokens, over max_prompt_length={cfg.max_prompt_length}")
        prompt_ids = prompt_ids[-cfg.max_prompt_length :]
        if report:
            report.prompts_truncated += 1
    budget = cfg.max_length - len(prompt_ids)
    responses = []
    for text in (chosen_text, rejected_text):
        ids = _response_ids(tokenizer, text)
        if len(ids) > budget:
            ids = ids[:budget]
            if report:
                report.responses_truncated += 1
        responses.append(ids)
    if responses[0] == responses[1]:
        raise BadRow("chosen and rejected are identical after truncation")
    return TokenizedPair(prompt_ids, responses[0], responses[1], example.row)


def tokenize_examples(
    examples: Sequence[PreferenceExample], tokenizer, cfg: DataConfig, source: str, report: LoadReport
) -> list[TokenizedPair]:
    pairs = []
    for example in examples:
        try:
            pairs.append(tokenize_pair(example, tokenizer, cfg, report))
        except BadRow as bad:
            if cfg.on_bad_row == "error":
                raise DataError(f"{source}, row {example.row}: {bad} (set data.on_bad_row=skip to skip such rows)") from None
            report.skipped[str(bad)] += 1
            report.kept -= 1
    return pairs


def load_pairs(data: DataConfig, tokenizer, rank: int) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Tokenized training and validation pairs, from the tokenized cache when this data and
    tokenizer were seen before (trainers.data.token_cache); rank 0 prints what was read, kept and
    skipped for both splits (bad rows are never dropped silently)."""
    directory, key = token_cache.cache_dir(), None
    if directory is not None:
        key = token_cache.cache_key(data, tokenizer)
    entry = directory / f"{key}.npz" if key else None
    splits, damaged = None, False
    if entry is not None and entry.is_file():
        try:
            splits = token_cache.load(entry)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:  # tokenized again, rewritten
            damaged = True
            if rank == 0:
                print(f"[trdpo] tokenized cache {entry} unreadable ({type(exc).__name__}: {exc}); tokenizing", flush=True)
    if splits is None:
        splits = []
        for split in ("train", "validation"):
            examples, report = load_examples(data, split)
            if split == "validation" and not (data.validation_path or data.validation_split):
                report = LoadReport(f"{report.source} (held-out tail)", rows_read=len(examples), kept=len(examples))
            splits.append((tokenize_examples(examples, tokenizer, data, report.source, report), report))
        # Every rank may write (a node's ranks share its cache, other nodes have their own unless
        # the home directory is shared): the first writes, later ones find the entry and skip.
        if entry is not None and (damaged or not entry.is_file()):
            try:
                token_cache.save(entry, splits)
            except OSError as exc:  # a read-only or full disk costs the next run the tokenization, nothing else
                if rank == 0:
                    print(f"[trdpo] tokenized cache not written to {entry} ({exc})", flush=True)
    elif rank == 0:
        print(f"[trdpo] tokenized pairs from the cache ({entry})", flush=True)
    if rank == 0:
        for split, (_, report) in zip(("train", "validation"), splits):
            print(f"[trdpo] {split}: {report.summary()}", flush=True)
    return splits[0][0], splits[1][0]
