"""Tokenized pairs cached on disk by content, so the trials of a sweep, the variants and seeds of
a study and every rerun tokenize a data set once per machine instead of once per worker and run
(on Anthropic-HH, minutes each time).

The key is a digest of everything the pairs depend on: the data section as written, the bytes of
the local data files, the tokenizer itself (its serialized vocabulary, merges, normalizer and
post-processor, special tokens and chat template: a changed tokenizer under the same name is a
miss), the versions of transformers, tokenizers and jinja2, and the source of the code that parses
and tokenizes (trainers.data.loading, trainers.data.synthetic).
Only data read from local files or generated (format ``synthetic``) is cached: a Hugging Face
dataset can change upstream under the same name, so it is tokenized every time.

Where: ``$TRDPO_TOKENIZED_CACHE`` (a directory; ``off`` disables it), by default
``~/.cache/trdpo/tokenized``. An entry is written atomically (temporary file, then rename); ranks
and trials that miss at once all tokenize, and a later writer finds the entry there and skips it
(on a shared home directory, identical content replaces identical content). Entries are ``.npz`` arrays (no
pickle) plus each split's load report, so the console still says what was read, kept and skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from trainers.config import DataConfig
from trainers.data.types import LoadReport, TokenizedPair
from trainers.state.fingerprint import file_digest

FORMAT = 1  # bump when the entry layout changes
_CODE = ("loading.py", "types.py", "synthetic.py")


def cache_dir() -> Path | None:
    setting = os.environ.get("TRDPO_TOKENIZED_CACHE", "")
    if setting.lower() == "off":
        return None
    return Path(setting).expanduser() if setting else Path.home() / ".cache" / "trdpo" / "tokenized"


def _tokenizer_identity(tokenizer) -> str | None:
    """What decides the ids a tokenizer produces, or None when it cannot be read (a slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return json.dumps({"class": type(tokenizer).__name__, "backend": backend.to_str(),
                       "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
                       "chat_template": getattr(tokenizer, "chat_template", None)}, sort_keys=True)


def _versions() -> str:
    """The libraries whose behaviour the ids depend on (encoding, chat-template rendering)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("transformers", "tokenizers", "jinja2"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return json.dumps(found, sort_keys=True)


def cache_key(data: DataConfig, tokenizer) -> str | None:
    """The entry's name, or None when this data is not cached (a Hugging Face dataset, a slow
    tokenizer, a data path that is not a readable file: loading then says what is wrong)."""
    if data.hf_dataset is not None:
        return None
    files = [Path(path).expanduser() for path in (data.path, data.validation_path) if path]
    if not all(file.is_file() for file in files):
        return None
    identity = _tokenizer_identity(tokenizer)
    if identity is None:
        return None
    digest = hashlib.sha256(f"trdpo-tokenized-{FORMAT}".encode())
    digest.update(json.dumps(data.model_dump(mode="json"), sort_keys=True).encode())
    for file in files:
        digest.update(file_digest(file).encode())  # the digest a run's fingerprint records
    digest.update(identity.encode())
    digest.update(_versions().encode())
    here = Path(__file__).parent
    for name in _CODE:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:32]


def _report_record(report) -> dict:
    record = asdict(report)
    record["skipped"] = dict(report.skipped)
    return record


def save(path: Path, splits: list[tuple[list, object]]) -> None:
    """``splits``: ``[(pairs, report)]`` for train and validation, stored as flat int32 arrays."""
    arrays, reports = {}, []
    for index, (pairs, report) in enumerate(splits):
        lengths = np.array([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs],
                           dtype=np.int64).reshape(-1, 3)
        tokens = itertools.chain.from_iterable(part for p in pairs for part in (p.prompt_ids, p.chosen_ids, p.rejected_ids))
        arrays[f"ids{index}"] = np.fromiter(tokens, dtype=np.int32, count=int(lengths.sum()))  # no list of every token
        arrays[f"lengths{index}"] = lengths
        arrays[f"rows{index}"] = np.array([p.row for p in pairs], dtype=np.int64)
        reports.append(_report_record(report))
    arrays["reports"] = np.frombuffer(json.dumps(reports).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz", delete=False) as handle:
        try:
            np.savez(handle, **arrays)
        except BaseException:
            os.unlink(handle.name)  # a full disk keeps no half-written entry
            raise
    os.replace(handle.name, path)


def load(path: Path) -> list[tuple[list, object]]:
    with np.load(path, allow_pickle=False) as entry:
        reports = json.loads(entry["reports"].tobytes().decode())
        splits = []
        for index, record in enumerate(reports):
            ids = entry[f"ids{index}"]
            lengths, rows = entry[f"lengths{index}"].tolist(), entry[f"rows{index}"].tolist()
            pairs, start = [], 0
            for (n_prompt, n_chosen, n_rejected), row in zip(lengths, rows):
                a, b, c = start + n_prompt, start + n_prompt + n_chosen, start + n_prompt + n_chosen + n_rejected
                pairs.append(TokenizedPair(ids[start:a].tolist(), ids[a:b].tolist(), ids[b:c].tolist(), row))
                start = c
            splits.append((pairs, LoadReport(**{**record, "skipped": Counter(record["skipped"])})))
    return splits
