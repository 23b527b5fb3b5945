"""Sharded training-state checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is one directory, ``<attempt>/step_00000120/``, under the run's ``checkpoints/``
(local path or object store). Each launch of the run is an attempt with its own directory
(``attempt-20261128T021500Z-1a2b``), so a rerun never writes over, or has its runner delete, a
checkpoint of an earlier attempt; resuming looks at every attempt.

    .metadata                 DCP's index: which bytes of which file hold which tensor slice
    __<rank>_0.distcp         each rank's shards of policy, reference and AdamW state
    rng_rank<r>.pt            each rank's RNG states (dropout)
    trainer_state.pt          rank 0: LR scheduler and reference-updater state
    trdpo_checkpoint.json     rank 0: format, step, world size

Every rank writes only its own shards, and on resume reads only the slices its new shards need,
whatever the world size was when it was saved (DCP reshards; 2 -> 1 and 1 -> 2 workers both work).
The data position needs no field: the batch order is a pure function of (seed, step).

A checkpoint counts only when it is complete: :func:`check_checkpoint` reads the DCP index and
checks that every file it names is there and long enough, and that every rank's RNG file exists.
:func:`find_resume_checkpoint` takes the newest complete one and names each damaged one it skips,
so a checkpoint is, for a reader, complete or absent.

Damaged is not unreachable. A checkpoint is damaged only when the store answered and the answer
proves it incomplete: a file is missing or shorter than the index says, or the index or info file
is there but does not parse. When the store does not answer (timeout, refused connection,
credentials, throttling) nothing is known about the checkpoint: resume stops with
:class:`~trainers.state.storage.StorageUnreachable` naming the store, and pruning deletes nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainers.compat import fsspec_checkpoint_reader, load_whole_checkpoint
from trainers.process_group import has_process_group
from trainers.state.storage import Storage, StorageUnreachable

FORMAT = "trdpo-dcp-1"
INFO_FILE = "trdpo_checkpoint.json"
TRAINER_STATE_FILE = "trainer_state.pt"
DCP_INDEX = ".metadata"  # torch.distributed.checkpoint's fixed name for the index
_NAME = re.compile(r"^step_(\d{8})$")


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns at every single-process save or load that it "assumes the intent": it is ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _model_states(policy, reference, adapters_only: bool = False) -> dict:
    states = {"policy": get_model_state_dict(policy)}
    if adapters_only:  # LoRA: the frozen base is the run's starting model (fingerprinted), not saved again
        states["policy"] = {k: v for k, v in states["policy"].items() if ".lora_" in k}  # PEFT's LoRA parameter names
    if reference is not None:
        states["reference"] = get_model_state_dict(reference)
    return states


def save_checkpoint(local_dir: Path, *, policy, reference, optimizer, scheduler, updater_state: dict, step: int,
                    rank: int, world: int, adapters_only: bool = False) -> None:
    """Write this rank's part of the checkpoint into ``local_dir`` (collective when distributed).

    Under Ray Train every rank writes into its own temporary directory and reports it; Ray merges
    the directories into one checkpoint in storage."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    state = {**_model_states(policy, reference, adapters_only), "optimizer": get_optimizer_state_dict(policy, optimizer)}
    with _quiet_single_process():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(local_dir)), no_dist=not has_process_group())
    torch.save(_rng_state(), local_dir / _rng_file(rank))
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict(), "updater": updater_state}, local_dir / TRAINER_STATE_FILE)
        info = {"format": FORMAT, "step": step, "world_size": world, "has_reference": reference is not None,
                "adapters_only": adapters_only}
        (local_dir / INFO_FILE).write_text(json.dumps(info), encoding="utf-8")


def _reader(store: Storage, name: str):
    if store.local:
        return dcp.FileSystemReader(store.path(name))
    return fsspec_checkpoint_reader(store.uri_of(name), **store.options)  # the store's timeouts and retries


def _torch_load(store: Storage, *parts: str):
    return torch.load(io.BytesIO(store.read_bytes(*parts)), map_location="cpu", weights_only=False)


@dataclass
class ResumeState:
    step: int
    updater: dict
    saved_world_size: int


def load_checkpoint(store: Storage, name: str, *, policy, reference, optimizer, scheduler, rank: int,
                    adapters_only: bool = False) -> ResumeState:
    """Restore everything in place from checkpoint ``name`` of ``store`` (collective when
    distributed); each rank reads only the tensor slices of its own shards."""
    info = json.loads(store.read_text(name, INFO_FILE))
    state = {**_model_states(policy, reference, adapters_only), "optimizer": get_optimizer_state_dict(policy, optimizer)}
    with _quiet_single_process():
        dcp.load(state, storage_reader=_reader(store, name), no_dist=not has_process_group())
    set_model_state_dict(policy, state["policy"], options=StateDictOptions(strict=not adapters_only))
    if reference is not None:
        set_model_state_dict(reference, state["reference"])
    set_optimizer_state_dict(policy, optimizer, state["optimizer"])
    trainer_state = _torch_load(store, name, TRAINER_STATE_FILE)
    scheduler.load_state_dict(trainer_state["scheduler"])
    if rank < info["world_size"]:  # a rank that did not exist when it was saved keeps a fresh RNG
        rng = _torch_load(store, name, _rng_file(rank))
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return ResumeState(int(info["step"]), trainer_state["updater"], int(info["world_size"]))


def check_checkpoint(store: Storage, name: str) -> str | None:
    """None when checkpoint ``name`` is complete, else what is wrong with it (one phrase).

    Only an answer of the store can make a checkpoint damaged (a file missing or short, an index
    that does not parse); a store that does not answer raises
    :class:`~trainers.state.storage.StorageUnreachable` instead."""
    try:
        info = json.loads(store.read_text(name, INFO_FILE))
    except FileNotFoundError:
        return f"no {INFO_FILE}"
    except ValueError as exc:  # read, but not UTF-8 JSON (UnicodeDecodeError is a ValueError too)
        return f"unreadable {INFO_FILE} ({type(exc).__name__})"
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        return f"unknown format {info.get('format') if isinstance(info, dict) else info!r}"
    try:
        world_size = int(info["world_size"])
    except (KeyError, TypeError, ValueError):
        return f"{INFO_FILE} has no world size"
    try:
        index = store.read_bytes(name, DCP_INDEX)
    except FileNotFoundError:
        return f"no DCP index {DCP_INDEX}"
    try:
        # DCP's own reader unpickles the same bytes; these came back whole from the store, so a
        # failure here is the file's content (cut short, or not an index), never the store.
        storage_data = pickle.loads(index).storage_data or {}
        needed: dict[str, int] = {}
        for item in storage_data.values():
            needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    except Exception as exc:  # noqa: BLE001 - every way a cut or foreign pickle can fail to load
        return f"unreadable DCP index {DCP_INDEX} ({type(exc).__name__})"
    for relative, length in sorted(needed.items()):
        try:
            size = store.size(name, relative)
        except FileNotFoundError:
            return f"missing shard file {relative}"
        if size < length:
            return f"shard file {relative} is cut short ({size} of {length} bytes)"
    for required in [TRAINER_STATE_FILE, *(_rng_file(r) for r in range(world_size))]:
        if not store.exists(name, required):
            return f"missing {required}"
    return None


def new_attempt() -> str:
    """A name for one launch of a run: sortable by time, unique across machines."""
    import datetime
    import secrets

    return f"attempt-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def checkpoint_steps(store: Storage) -> list[tuple[int, str]]:
    """``(step, "<attempt>/<step dir>")`` of every checkpoint under ``store``, newest first (a step
    written by several attempts: the latest attempt first)."""
    found = []
    for attempt in store.subdirs():
        if attempt.startswith("attempt-"):
            found += [(int(m.group(1)), attempt, name) for name in store.subdirs(attempt) if (m := _NAME.match(name))]
    return [(step, f"{attempt}/{name}") for step, attempt, name in sorted(found, reverse=True)]


def find_resume_checkpoint(store: Storage) -> tuple[str | None, list[str]]:
    """The newest complete checkpoint (or None) and one line per damaged newer one skipped.

    Raises :class:`~trainers.state.storage.StorageUnreachable` when the store does not answer: an
    outage must not send a run back to an older checkpoint or to step 0."""
    skipped = []
    try:
        for step, name in checkpoint_steps(store):
            problem = check_checkpoint(store, name)
            if problem is None:
                return name, skipped
            skipped.append(f"checkpoint {store.uri_of(name)} is damaged ({problem}); skipping it")
    except StorageUnreachable as exc:
        raise StorageUnreachable(store.uri, "look for a checkpoint to resume from in", f"{exc.error}; nothing was "
                                 "skipped or deleted: rerun when the store answers") from None
    return None, skipped


def choose_resume_checkpoint(store: Storage, rank: int, distributed: bool) -> tuple[str | None, list[str]]:
    """The checkpoint every rank resumes from (None: start at step 0) and the damaged ones skipped.

    One rank decides, so that every rank loads the same checkpoint; an error deciding (a store
    that does not answer) reaches every rank, which would otherwise wait in the broadcast."""
    resume, skipped, failure = None, [], None
    if rank == 0:
        try:
            resume, skipped = find_resume_checkpoint(store)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            failure = exc
    if distributed:
        import torch.distributed as dist

        decision = [resume, failure if rank != 0 or failure is None else _portable(failure)]
        dist.broadcast_object_list(decision, src=0)
        resume = decision[0]
        failure = failure if rank == 0 else decision[1]  # rank 0 keeps its own, with its traceback
    if failure is not None:
        raise failure
    return resume, skipped


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (to reach the other ranks), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send its description instead
        return RuntimeError(f"rank 0 failed while choosing the checkpoint to resume from: {error!r}")


def prune_checkpoints(store: Storage, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (and anything newer than them, which may be
    still arriving from other ranks); delete the older ones.

    When the store does not answer, nothing more is deleted this time (the older checkpoints may
    be all there is), and training goes on."""
    complete = 0
    try:
        for _, name in checkpoint_steps(store):
            if complete >= keep:
                store.remove(name)
            elif check_checkpoint(store, name) is None:
                complete += 1
    except StorageUnreachable as exc:
        print(f"[trdpo] keeping older checkpoints for now: {exc}", flush=True)


def read_checkpoint(store: Storage, name: str | None = None) -> dict:
    """A whole checkpoint as plain, unsharded CPU tensors in one process: ``policy``,
    ``reference`` (None for SFT), ``optimizer``, plus ``step``, ``updater`` and ``world_size``
    (for tools and tests; it holds everything in memory). ``name`` defaults to the newest
    complete checkpoint."""
    if name is None:
        name, _ = find_resume_checkpoint(store)
        if name is None:
            raise FileNotFoundError(f"no complete checkpoint in {store.uri}")
    with _quiet_single_process():
        state = load_whole_checkpoint(_reader(store, name))
    info = json.loads(store.read_text(name, INFO_FILE))
    trainer_state = _torch_load(store, name, TRAINER_STATE_FILE)
    return {"policy": state["policy"], "reference": state.get("reference"), "optimizer": state["optimizer"],
            "step": info["step"], "world_size": info["world_size"], "updater": trainer_state["updater"]}
