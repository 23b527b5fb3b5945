"""Damaged is not unreachable: a checkpoint is skipped only when the store's answer proves it
incomplete; a store that fails to answer stops the resume in one line and nothing is deleted.

Two real single-process DCP checkpoints (steps 2 and 4) of a small model sit in a local store; a
stand-in fsspec file system raises chosen errors for chosen files, as an object store's client
does on a timeout, a refused connection or a denied request."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from trainers.state.checkpoint import (DCP_INDEX, INFO_FILE, check_checkpoint, checkpoint_steps, find_resume_checkpoint,
                                 prune_checkpoints, save_checkpoint)
from trainers.errors import UserFacingError
from trainers.state.storage import Storage, StorageUnreachable, is_store_failure

ATTEMPT = "attempt-20261129T000000Z-abcd"


class FailingFS(LocalFileSystem):
    """The local file system, except that touching a path containing ``match`` raises ``error``."""

    def __init__(self, match: str, error: BaseException):
        super().__init__(skip_instance_cache=True)
        self.match, self.error = match, error

    def _check(self, path) -> None:
        if self.match in str(path):
            raise self.error

    def cat_file(self, path, *args, **kwargs):
        self._check(path)
        return super().cat_file(path, *args, **kwargs)

    def info(self, path, **kwargs):
        self._check(path)
        return super().info(path, **kwargs)

    def ls(self, path, *args, **kwargs):
        self._check(path)
        return super().ls(path, *args, **kwargs)


def _botocore_refused() -> BaseException:
    from botocore.exceptions import EndpointConnectionError

    return EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket")


@pytest.fixture
def store(tmp_path) -> Storage:
    """Checkpoints of steps 2 and 4 of one attempt, as the training loop writes them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for step in (2, 4):
        model(torch.randn(3, 8)).sum().backward()
        optimizer.step()
        save_checkpoint(tmp_path / "checkpoints" / ATTEMPT / f"step_{step:08d}", policy=model, reference=None,
                        optimizer=optimizer, scheduler=scheduler, updater_state={}, step=step, rank=0, world=1)
    return Storage(tmp_path / "checkpoints")


NEWEST = f"{ATTEMPT}/step_00000004"
OLDER = f"{ATTEMPT}/step_00000002"


def test_both_checkpoints_are_complete_and_the_newest_is_resumed(store):
    assert [name for _, name in checkpoint_steps(store)] == [NEWEST, OLDER]
    assert check_checkpoint(store, NEWEST) is None and check_checkpoint(store, OLDER) is None
    assert find_resume_checkpoint(store) == (NEWEST, [])


def _shard_of(store: Storage, name: str) -> tuple[str, int]:
    index = pickle.loads(store.read_bytes(name, DCP_INDEX))
    item = max(index.storage_data.values(), key=lambda i: i.offset + i.length)
    return item.relative_path, item.offset + item.length


@pytest.mark.parametrize("damage, phrase", [
    ("cut index", "unreadable DCP index .metadata"),
    ("no index", "no DCP index .metadata"),
    ("no shard", "missing shard file"),
    ("short shard", "is cut short"),
    ("not json", f"unreadable {INFO_FILE}"),
    ("no info", f"no {INFO_FILE}"),
])
def test_a_provably_incomplete_checkpoint_is_skipped_with_the_reason(store, damage, phrase):
    directory = Path(store.path(NEWEST))
    shard, length = _shard_of(store, NEWEST)
    if damage == "cut index":
        (directory / DCP_INDEX).write_bytes((directory / DCP_INDEX).read_bytes()[:40])
    elif damage == "no index":
        (directory / DCP_INDEX).unlink()
    elif damage == "no shard":
        (directory / shard).unlink()
    elif damage == "short shard":
        (directory / shard).write_bytes((directory / shard).read_bytes()[: length - 1])
    elif damage == "not json":
        (directory / INFO_FILE).write_text(json.dumps({"format": "trdpo-dcp-1"})[:10])
    else:
        (directory / INFO_FILE).unlink()
    resume, skipped = find_resume_checkpoint(store)
    assert resume == OLDER
    assert len(skipped) == 1 and NEWEST in skipped[0] and phrase in skipped[0]


@pytest.mark.parametrize("error", [ConnectionRefusedError(111, "Connection refused"), TimeoutError("read timed out"),
                                   PermissionError(13, "Access Denied"), _botocore_refused()],
                         ids=["refused", "timeout", "denied", "botocore"])
@pytest.mark.parametrize("where", [DCP_INDEX, INFO_FILE, "__0_0.distcp", "step_00000004"])
def test_a_store_that_does_not_answer_stops_the_resume_and_nothing_is_deleted(store, error, where, capsys):
    before = sorted(p for p in Path(store.path()).rglob("*"))
    store.fs = FailingFS(f"step_00000004/{where}" if where != "step_00000004" else where, error)
    with pytest.raises(StorageUnreachable) as raised:
        find_resume_checkpoint(store)
    message = str(raised.value)
    assert isinstance(raised.value, UserFacingError) and "\n" not in message
    assert store.uri in message and type(error).__name__ in message and "nothing was skipped or deleted" in message
    # Pruning (which would delete the older checkpoint when keep=1) deletes nothing either.
    prune_checkpoints(store, keep=1)
    assert "keeping older checkpoints for now" in capsys.readouterr().out
    assert sorted(p for p in Path(store.path()).rglob("*")) == before


def test_a_listing_that_fails_is_not_an_empty_run(store):
    """An unanswered listing must not read as "no checkpoints" (the driver then deletes the run)."""
    store.fs = FailingFS("checkpoints", PermissionError(13, "Access Denied"))
    with pytest.raises(StorageUnreachable, match="cannot list"):
        checkpoint_steps(store)
    with pytest.raises(StorageUnreachable, match="cannot look up"):
        store.exists("anything")
    with pytest.raises(StorageUnreachable):
        store.remove(OLDER)
    assert Path(store.path(OLDER)).is_dir()


def test_absent_files_stay_absent_and_bugs_stay_bugs(store):
    assert not store.exists("no-such-file") and store.subdirs("no-such-dir") == []
    with pytest.raises(FileNotFoundError):
        store.read_bytes("no-such-file")
    assert is_store_failure(_botocore_refused()) and is_store_failure(TimeoutError())
    assert not is_store_failure(FileNotFoundError()) and not is_store_failure(KeyError("x"))
    store.fs = FailingFS(OLDER, KeyError("a bug in our own code"))
    with pytest.raises(KeyError):
        store.read_bytes(OLDER, INFO_FILE)


def test_the_error_survives_pickling_out_of_a_worker():
    error = StorageUnreachable("s3://bucket/runs", "read", _botocore_refused())
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is StorageUnreachable and str(copy) == str(error) and "EndpointConnectionError" in str(copy)


def test_an_s3_store_follows_the_endpoint_the_environment_names_now(monkeypatch):
    """fsspec keeps one file system per set of options in each process; the endpoint is one of
    them, so a process whose environment names a new endpoint (a test suite starting a second
    S3 server) does not keep talking to the first one."""
    pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    first = Storage("s3://bucket/run").fs
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    second = Storage("s3://bucket/run").fs
    assert first is not second
    assert (first.endpoint_url, second.endpoint_url) == ("http://127.0.0.1:9", "http://127.0.0.1:10")
    assert Storage("s3://bucket/other").fs is second  # same options, the same client
