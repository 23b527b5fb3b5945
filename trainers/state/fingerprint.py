"""A run is its fingerprint: everything that changes what it trains, and nothing else.

The fingerprint is a flat ``{"training.beta": 0.1, ...}`` of the model, tokenizer, data and training
sections, minus the fields that change how a run is executed or logged but not its result (worker
count, logging and checkpoint cadence, activation checkpointing, packing and chunked log-probs,
which are exact), plus the global batch size
(per-device batch x workers x accumulation: it fixes which pairs each step sees, so a run can move
from 2 workers to 1 with twice the accumulation and continue the same run), plus digests of the
local files it reads (data files by content; model directories by config and weight-file sizes),
so an edited file is a changed run even under the same path.

A rerun with the same name continues the run only when the fingerprints agree; otherwise the
differing fields are named.

The fingerprint compares behaviour, not the field list. A field added after runs were written is
listed in :data:`FIELDS_ADDED_LATER` with the value that reproduces what runs did before it existed;
at that value it is left out of the fingerprint, so an old run's fingerprint (which lacks it)
matches and the run resumes, and any other value is a changed run naming the field.
``model.keep_dropout`` is also left out where dropout is off either way (a model without dropout,
as the tiny Llama, Pythia or Llama-family configs); a run that trained a model with dropout is told
to set ``model.keep_dropout: true`` to continue.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from trainers.config import DataConfig, ModelConfig, TokenizerConfig, TrainingConfig, flatten

# How a run is executed, not what it computes (to float round-off).
EXECUTION_ONLY = {
    "training.num_workers", "training.resources_per_worker.CPU", "training.resources_per_worker.GPU",
    "training.per_device_batch_size", "training.gradient_accumulation_steps",
    "training.log_every", "training.eval_every", "training.checkpoint_every", "training.keep_checkpoints",
    "training.max_failures", "training.activation_checkpointing", "training.defer_gradient_sync",
    "training.export_steps", "training.packing", "training.max_tokens_per_micro_batch", "training.logprob_chunk_tokens",
    "training.shard_one_worker", "model.attn_implementation",
}
# Fields added after runs were written, with the value under which a run behaves as every run did
# before the field existed (runs before model.keep_dropout trained with the model's own dropout).
FIELDS_ADDED_LATER: dict[str, Any] = {
    "model.keep_dropout": True,
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _model_dir_digest(path: Path) -> str:
    """config.json by content, weight files by name and size (hashing gigabytes of weights on
    every launch would cost minutes; a retrained model in the same directory changes its files)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _local(value: Any) -> Path | None:
    if isinstance(value, str) and "://" not in value and Path(value).expanduser().exists():
        return Path(value).expanduser()
    return None


def source_digest(value: Any) -> str | None:
    """The ``#content`` digest of a local file or model directory ``value`` (None: not local)."""
    path = _local(value)
    if path is None:
        return None
    return file_digest(path) if path.is_file() else _model_dir_digest(path)


def has_dropout(model: ModelConfig) -> bool:
    """Whether the causal LM has a dropout probability above 0: counted on a meta-device skeleton
    of each local model directory (config.json only: heads a causal LM never builds, such as
    ``classifier_dropout``, do not count); the tiny Llama has none; a model on the Hub or in an
    object store is assumed to have some (nothing is downloaded here)."""
    from trainers.model.build import dropout_sites, model_skeleton

    if model.tiny is not None:
        return False
    for name in (model.name_or_path, model.reference_name_or_path):
        path = _local(name)
        if name is not None and (path is None or not (path / "config.json").is_file()):
            return True
        if name is not None and any(getattr(holder, attribute) > 0
                                    for holder, attribute in dropout_sites(model_skeleton(model, None, str(path)))):
            return True
    return False


def fingerprint(model: ModelConfig, tokenizer: TokenizerConfig, data: DataConfig, training: TrainingConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, cfg in (("model", model), ("tokenizer", tokenizer), ("data", data), ("training", training)):
        flat.update(flatten(cfg.model_dump(mode="json"), f"{section}."))
    for name in EXECUTION_ONLY:
        flat.pop(name, None)
    for name, value_before_the_field in FIELDS_ADDED_LATER.items():
        if name in flat and flat[name] == value_before_the_field:
            flat.pop(name)
    if "model.keep_dropout" in flat and not has_dropout(model):  # no dropout to switch off
        flat.pop("model.keep_dropout")
    flat["training.global_batch_size"] = training.per_device_batch_size * training.num_workers * training.gradient_accumulation_steps
    for field in ("data.path", "data.validation_path", "data.hf_dataset", "model.name_or_path",
                  "model.reference_name_or_path", "tokenizer.name_or_path"):
        digest = source_digest(flat.get(field))
        if digest is not None:
            flat[f"{field}#content"] = digest
    return json.loads(json.dumps(flat))  # as it reads back from JSON (tuples become lists)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``field (old -> new)`` for every field that differs, in a stable order."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            label = key.replace("#content", " (file content)")
            if key.endswith("#content"):
                out.append(f"{label} changed")
            elif key == "model.keep_dropout":  # absent: the model's own dropout ran
                hint = "; set model.keep_dropout: true to continue it" if key not in old else ""
                out.append(f"{label} ({old.get(key, True)!r} -> {new.get(key, True)!r}: the run trained "
                           f"{'with' if key not in old else 'without'} the model's dropout{hint})")
            elif key in FIELDS_ADDED_LATER:  # absent: the behaviour from before the field existed
                before = FIELDS_ADDED_LATER[key]
                hint = f"; set {key}: {before!r} to continue it" if key not in old else ""
                out.append(f"{label} ({old.get(key, before)!r} -> {new.get(key, before)!r}{hint})")
            else:
                out.append(f"{label} ({old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r})")
    return out
