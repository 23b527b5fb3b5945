"""Where runs live: a local directory or an object-store URI (``s3://``, ``gs://``, ...).

One small wrapper over fsspec serves the workers (checkpoints, the exported policy) and the driver
(fingerprints, results). Ray Train and Tune get the same file system as a pyarrow file system, so
every process of a run sees the same store with the same settings (endpoint, credentials from the
usual environment variables, e.g. ``AWS_ENDPOINT_URL`` for an S3-compatible server).

    store = Storage("s3://bucket/runs")
    store.write_text("fingerprint.json", "{...}", "demo-dpo")   # s3://bucket/runs/demo-dpo/fingerprint.json
    store.put_dir(local_dir, "demo-dpo", "policy")

Absent and unreachable are different answers. A missing file raises ``FileNotFoundError`` (or
``exists`` says False); any failure of the store itself (a refused connection, a timeout, bad
credentials, throttling, a permission error) raises :class:`StorageUnreachable`, naming the URI
and the error, so that no caller mistakes an outage for a missing or damaged file.

Object stores (``s3://``) get bounded patience: connect timeout 10 s, read timeout
``$TRDPO_STORAGE_TIMEOUT_S`` (30 s), at most 3 attempts per request (botocore's standard retry
mode, with backoff; throttling is retried too) and one more transfer attempt by s3fs; on top, each
call of this class has a deadline of 2 x 3 x (10 + 30) s = 4 min, plus 1 s per MiB it moves. The
deadline is needed: the HTTP client starts its read timeout only once a request's body is sent,
so a PUT to a server that accepts the connection and never reads (it waits for "100 Continue")
would wait forever. A refused connection or a credentials error fails in seconds.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from pathlib import Path

from trainers.errors import UserFacingError

CONNECT_TIMEOUT_S = 10.0
ATTEMPTS = 3  # per request, by botocore (the first try included)
TRANSFER_ATTEMPTS = 2  # s3fs's own loop around a request that timed out or broke off
SLOWEST_TRANSFER_BYTES_PER_S = 1 << 20  # what a call's deadline allows for the bytes it moves
# Errors raised by these packages come from talking to a store, never from a file's contents.
_CLIENT_PACKAGES = frozenset({"botocore", "aiobotocore", "s3fs", "aiohttp", "urllib3", "requests", "google", "gcsfs",
                              "adlfs", "azure", "fsspec", "pyarrow"})


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file``."""
    return "://" in uri and not uri.startswith("file://")


def read_timeout_s() -> float:
    return float(os.environ.get("TRDPO_STORAGE_TIMEOUT_S", "30"))


def fs_options(uri: str) -> dict:
    """fsspec options for ``uri``: no listings cache on a remote store (other processes write the
    same prefixes, and a cached listing would hide their checkpoints), bounded timeouts and
    retries on S3."""
    if not is_remote(uri):
        return {}
    options: dict = {"use_listings_cache": False}
    if uri.split("://")[0] in ("s3", "s3a"):
        read = read_timeout_s()
        options["config_kwargs"] = {"connect_timeout": min(CONNECT_TIMEOUT_S, read), "read_timeout": read,
                                    "retries": {"total_max_attempts": ATTEMPTS, "mode": "standard"}}
        # botocore would read the endpoint from the environment itself; naming it here also keys
        # fsspec's per-process cache of file systems, which otherwise hands a process whose
        # environment now names another endpoint the client made for the first one.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
            options["endpoint_url"] = endpoint
    return options


def is_store_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the store (or the way to it) failing, rather than a file being absent or
    our own code failing: an ``OSError`` other than ``FileNotFoundError`` (permission, timeout,
    refused connection) or any error of a storage client library (botocore, aiohttp, ...)."""
    if isinstance(exc, FileNotFoundError):
        return False
    if isinstance(exc, OSError):
        return True
    return any(cls.__module__.split(".")[0] in _CLIENT_PACKAGES for cls in type(exc).__mro__)


class Storage:
    def __init__(self, uri: str):
        import fsspec

        uri = str(uri)
        if not is_remote(uri):
            uri = str(Path(uri.removeprefix("file://")).expanduser().resolve())
        self.uri = uri.rstrip("/")
        self.options = fs_options(self.uri)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **self.options)
        except ImportError as exc:  # fsspec names the package a scheme needs
            extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(self.uri.split("://")[0], "")
            hint = f" (pip install 'trdpo[{extra}]')" if extra else ""
            raise StorageError(f"{self.uri}: {exc}{hint}") from None
        if "config_kwargs" in self.options and hasattr(self.fs, "retries"):
            self.fs.retries = TRANSFER_ATTEMPTS
        self.local = not is_remote(self.uri)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def child(self, *parts: str) -> "Storage":
        return Storage(self.uri_of(*parts))

    def path(self, *parts: str) -> str:
        """The file system's own path (no scheme) of ``parts`` under the root."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts]) if parts else self.uri

    def _deadline(self, size: int = 0) -> dict:
        """fsspec's own overall timeout for one call of an async file system (module docstring);
        nothing for a local one (its calls take no such argument)."""
        if not getattr(self.fs, "async_impl", False):
            return {}
        read = read_timeout_s()
        return {"timeout": TRANSFER_ATTEMPTS * ATTEMPTS * (min(CONNECT_TIMEOUT_S, read) + read)
                + size / SLOWEST_TRANSFER_BYTES_PER_S}

    @contextlib.contextmanager
    def _answering(self, doing: str, *parts: str):
        """Turn a failure of the store into :class:`StorageUnreachable` naming the URI; a missing
        file stays ``FileNotFoundError`` when reading (not when writing: there it means a
        directory that cannot be made), anything else (a bug) stays itself."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            writing = doing == "write to" and isinstance(exc, FileNotFoundError)
            if not (writing or is_store_failure(exc)):
                raise
            raise StorageUnreachable(self.uri_of(*parts), doing, exc) from exc

    def exists(self, *parts: str) -> bool:
        """Whether ``parts`` is there. Only a definite "not found" is False: fsspec's own
        ``exists`` answers False for any error on some file systems (a local permission error)."""
        with self._answering("look up", *parts):
            try:
                self.fs.info(self.path(*parts), **self._deadline())
                return True
            except FileNotFoundError:
                return False

    def size(self, *parts: str) -> int:
        with self._answering("look up", *parts):
            return int(self.fs.size(self.path(*parts), **self._deadline()))

    def read_bytes(self, *parts: str) -> bytes:
        with self._answering("read", *parts):
            return self.fs.cat_file(self.path(*parts), **self._deadline())

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def write_text(self, text: str, *parts: str) -> None:
        """Whole or not at all: a local file is written beside and renamed; an object-store put
        is atomic by itself."""
        target = self.path(*parts)
        with self._answering("write to", *parts):
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(text)
                os.replace(tmp, target)
            else:
                data = text.encode("utf-8")
                self.fs.pipe_file(target, data, **self._deadline(len(data)))

    def subdirs(self, *parts: str) -> list[str]:
        """Names of the directories directly under ``parts`` (empty when it does not exist)."""
        with self._answering("list", *parts):
            try:
                entries = self.fs.ls(self.path(*parts), detail=True, **self._deadline())
            except FileNotFoundError:
                return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")

    def put_file(self, local_file: str | Path, *parts: str) -> None:
        """Copy one local file to ``parts`` (replacing it)."""
        target = self.path(*parts)
        with self._answering("write to", *parts):
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs.put_file(str(local_file), target, **self._deadline(Path(local_file).stat().st_size))

    def put_dir(self, local_dir: str | Path, *parts: str) -> None:
        """Copy a local directory's files to ``parts`` (created; existing files replaced)."""
        local_dir = Path(local_dir)
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.put_file(file, *parts, *file.relative_to(local_dir).parts)

    def get_dir(self, local_dir: str | Path, *parts: str) -> Path:
        """Copy the files under ``parts`` into ``local_dir`` (which is returned)."""
        local_dir = Path(local_dir)
        base = self.path(*parts)
        with self._answering("read", *parts):
            for name, entry in self.fs.find(base, detail=True, **self._deadline()).items():
                relative = posixpath.relpath(name, base)
                target = local_dir / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(name, str(target), **self._deadline(int(entry.get("size") or 0)))
        return local_dir

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            with self._answering("delete", *parts):
                self.fs.rm(self.path(*parts), recursive=True, **self._deadline())

    def check_writable(self) -> None:
        """Write and delete a probe file: a read-only directory or a bucket without write access
        fails here, in one line, before anything starts."""
        probe = f".trdpo-write-probe-{os.getpid()}"
        try:
            self.write_text("ok", probe)
            self.remove(probe)
        except StorageUnreachable as exc:
            raise StorageUnreachable(self.uri, "write to", exc.error) from None

    def pyarrow(self):
        """``(pyarrow file system, path)`` for Ray's ``storage_filesystem`` / ``storage_path``."""
        import pyarrow.fs

        if self.local:
            return pyarrow.fs.LocalFileSystem(), self.root
        from trainers.state.pyarrow_handler import DeadlineHandler

        return pyarrow.fs.PyFileSystem(DeadlineHandler(self)), self.root


class UploadOnClose:
    """A file Ray writes a checkpoint file into: the bytes go to a local temporary file, and
    ``close`` uploads it in one deadlined call. Written through fsspec's own file object, each
    part's PUT has no overall deadline, and a store that accepts the connection and never answers
    holds the checkpoint (and the run) forever."""

    def __init__(self, storage: "Storage", path: str):
        self.storage, self.path = storage, path
        self.buffer = tempfile.NamedTemporaryFile(prefix="trdpo-upload-", delete=False)
        self.closed = False

    def write(self, data) -> int:
        return self.buffer.write(data)

    def tell(self) -> int:
        return self.buffer.tell()

    def flush(self) -> None:
        self.buffer.flush()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.buffer.close()
            size = os.path.getsize(self.buffer.name)
            with self.storage._answering("write to", posixpath.relpath(self.path, self.storage.root)):
                self.storage.fs.put_file(self.buffer.name, self.path, **self.storage._deadline(size))
        except Exception as exc:
            _failed_uploads.append(exc)
            raise
        finally:
            os.unlink(self.buffer.name)


# pyarrow drops an error raised while closing a file it copies (pyarrow.fs.copy_files, which Ray
# Train persists checkpoints with), so the upload's failure is kept here for the caller to raise.
_failed_uploads: list[Exception] = []


def raise_failed_upload() -> None:
    """Raise the first upload through :meth:`Storage.pyarrow` that failed since the last call."""
    failed = _failed_uploads[:1]
    _failed_uploads.clear()
    if failed:
        raise failed[0]


class StorageError(UserFacingError, OSError):
    """A store that cannot be used (unwritable, unreachable); the message names it."""


class StorageUnreachable(StorageError):
    """The store failed to answer (refused, timed out, denied, throttled): nothing is known about
    the files, so nothing may be concluded from it, skipped or deleted."""

    def __init__(self, uri: str, doing: str, error: BaseException | str):
        self.uri, self.doing = uri, doing
        # Kept as text: a storage client's exception need not survive pickling out of a Ray worker.
        detail = " ".join(str(error).split())[:300] or "no answer in time"
        self.error = error if isinstance(error, str) else f"{type(error).__name__}: {detail}"
        super().__init__(f"cannot {doing} {uri} ({self.error})")

    def __reduce__(self):
        return (type(self), (self.uri, self.doing, self.error))


MODEL_CACHE = Path(os.environ.get("TRDPO_MODEL_CACHE", "~/.cache/trdpo/models")).expanduser()
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


def local_model_dir(name: str, weights: bool = True) -> str:
    """A model named by a storage URI (a policy exported to ``s3://...``) as a local directory, for
    ``from_pretrained``; anything else is returned as it is. Files are copied once per machine into
    ``$TRDPO_MODEL_CACHE`` and again only when their size or modification stamp changes; weight
    files only when ``weights`` (ranks that only build the skeleton need the config alone)."""
    if not is_remote(name):
        return name
    import hashlib
    import json

    from filelock import FileLock

    store = Storage(name)
    target = MODEL_CACHE / hashlib.sha256(store.uri.encode()).hexdigest()[:16]
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"), store._answering("read"):  # the ranks of one machine copy once
        manifest_path = target / ".trdpo-manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        for remote in store.fs.find(store.root, detail=True, **store._deadline()).values():
            relative = posixpath.relpath(remote["name"], store.root)
            if relative.endswith(WEIGHT_FILES) and not weights:
                continue
            stamp = f"{remote.get('size')}:{remote.get('ETag') or remote.get('mtime') or remote.get('LastModified')}"
            local = target / relative
            if manifest.get(relative) != stamp or not local.exists():
                local.parent.mkdir(parents=True, exist_ok=True)
                store.fs.get_file(remote["name"], str(local), **store._deadline(int(remote.get("size") or 0)))
                manifest[relative] = stamp
        manifest_path.write_text(json.dumps(manifest))
    return str(target)
