"""``trdpo export``: which run an export reads, from an experiment file or from the run's storage.

An experiment file names its run as ``trdpo train`` does (``<tracking.output_dir>/<run name>``);
a run's storage directory (or URI) carries its own description in ``run.json``: the fingerprint
holds every model and tokenizer field, so the run needs no file to be exported. The export itself
is :func:`trainers.state.checkpoint_export.export_checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.config import load_experiment
from orchestrator.train import RUN_FILE, run_name_of
from trainers.config import ModelConfig, TokenizerConfig
from trainers.state.checkpoint_export import ExportError, RunModels
from trainers.state.storage import Storage, is_remote

EXPERIMENT_SUFFIXES = (".yaml", ".yml", ".json")
BASE_DIGEST = "model.name_or_path#content"  # the fingerprint's digest of a local base model directory


def _unflatten(flat: dict, prefix: str) -> dict:
    """``{"model.lora.rank": 4}`` -> ``{"lora": {"rank": 4}}`` for the keys under ``prefix``
    (file digests, ``…#content``, are not fields)."""
    tree: dict = {}
    for key, value in flat.items():
        if not key.startswith(prefix) or "#" in key:
            continue
        *parents, leaf = key[len(prefix):].split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _recorded_fingerprint(store: Storage) -> dict | None:
    try:
        return json.loads(store.read_text(RUN_FILE))["fingerprint"]
    except FileNotFoundError:
        return None


def run_from_storage(store: Storage) -> RunModels:
    """The run recorded in ``store/run.json`` (written by ``trdpo train`` / ``run`` / sweeps)."""
    flat = _recorded_fingerprint(store)
    if flat is None:
        raise ExportError(f"{store.uri}: not a run's storage (no {RUN_FILE}); pass the experiment file instead")
    return RunModels(ModelConfig.model_validate(_unflatten(flat, "model.")),
                     TokenizerConfig.model_validate(_unflatten(flat, "tokenizer.")),
                     flat.get("training.stage", "trdpo"), flat.get("training.ref_update", "none"),
                     flat.get(BASE_DIGEST))


def export_source(target: str, overrides: tuple[str, ...]) -> tuple[RunModels, Storage]:
    """``(run, its storage)`` from an experiment file (with ``--set`` overrides) or a run's storage."""
    local = not is_remote(target)
    if local and Path(target).suffix in EXPERIMENT_SUFFIXES and Path(target).is_file():
        config = load_experiment(Path(target), overrides)
        t = config.training
        store = Storage(config.tracking.output_dir).child(run_name_of(config))
        recorded = _recorded_fingerprint(store) or {}
        return RunModels(config.model, config.tokenizer, t.stage, t.ref_update, recorded.get(BASE_DIGEST)), store
    if overrides:
        raise ExportError("--set applies to an experiment file; a run's storage carries its own settings")
    if local and not Path(target).exists():
        raise ExportError(f"{target}: no such experiment file or run directory")
    store = Storage(target)
    return run_from_storage(store), store
