"""A checkpoint upload to an object store that accepts connections and never answers fails within
the storage deadline, as StorageUnreachable, instead of holding the run forever. The store is a
loopback socket that accepts and never reads; the upload goes the way Ray Train persists a
checkpoint (pyarrow.fs.copy_files into Storage.pyarrow())."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from trainers.state.storage import Storage, StorageUnreachable, raise_failed_upload

pytestmark = pytest.mark.integration  # a server (a loopback socket in a thread)


@pytest.fixture
def silent_store(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}", "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                        "TRDPO_STORAGE_TIMEOUT_S": "0.5"}.items():
        monkeypatch.setenv(name, value)
    yield Storage("s3://bucket/runs/silent")
    server.close()
    for connection in accepted:
        connection.close()


def test_a_checkpoint_upload_to_a_silent_store_fails_within_the_deadline(silent_store, tmp_path):
    from ray.train.v2._internal.execution.storage import _pyarrow_fs_copy_files

    checkpoint = tmp_path / "step_00000003"
    checkpoint.mkdir()
    (checkpoint / "__0_0.distcp").write_bytes(b"\0" * 4096)
    filesystem, root = silent_store.pyarrow()
    deadline_s = silent_store._deadline(4096)["timeout"]  # 2 transfers x 3 requests x (0.5 + 0.5) s, plus size
    started = time.monotonic()
    _pyarrow_fs_copy_files(str(checkpoint), f"{root}/checkpoints/attempt-1/step_00000003", destination_filesystem=filesystem)
    with pytest.raises(StorageUnreachable) as raised:
        raise_failed_upload()
    waited = time.monotonic() - started
    assert str(raised.value).startswith("cannot write to s3://bucket/runs/silent/checkpoints/attempt-1/step_00000003/__0_0.distcp (")
    assert waited < deadline_s + 5
    raise_failed_upload()  # reported once
