"""The pyarrow file system that Ray Train writes a run's checkpoints through (``Storage.pyarrow``):
fsspec's handler, except that a file written is uploaded by one :class:`Storage` call on close, so
the upload has the storage's deadline and a silent store fails as :class:`StorageUnreachable`."""

from __future__ import annotations

import pyarrow
import pyarrow.fs

from trainers.state.storage import Storage, UploadOnClose


class DeadlineHandler(pyarrow.fs.FSSpecHandler):
    def __init__(self, storage: Storage):
        super().__init__(storage.fs)
        self.storage = storage

    def __reduce__(self):  # Ray ships the file system to its workers; each rebuilds its own client
        return type(self), (Storage(self.storage.uri),)

    def open_output_stream(self, path: str, metadata):
        return pyarrow.PythonFile(UploadOnClose(self.storage, path), mode="w")

    def open_append_stream(self, path: str, metadata):
        raise NotImplementedError("object stores cannot append to a file")
