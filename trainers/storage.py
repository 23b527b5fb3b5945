"""Where runs live: a local directory or an object-store URI (``s3://``, ``gs://``, ...).

One small wrapper over fsspec serves the workers (checkpoints, the exported policy) and the driver
(fingerprints, results). Ray Train and Tune get the same file system as a pyarrow file system, so
every process of a run sees the same store with the same settings (endpoint, credentials from the
usual environment variables, e.g. ``AWS_ENDPOINT_URL`` for an S3-compatible server).

    store = Storage("s3://bucket/runs")
    store.write_text("fingerprint.json", "{...}", "demo-dpo")   # s3://bucket/runs/demo-dpo/fingerprint.json
    store.put_dir(local_dir, "demo-dpo", "policy")
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path
from trainers.errors import UserFacingError


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file``."""
    return "://" in uri and not uri.startswith("file://")


class Storage:
    def __init__(self, uri: str):
        import fsspec

        uri = str(uri)
        if not is_remote(uri):
            uri = str(Path(uri.removeprefix("file://")).expanduser().resolve())
        self.uri = uri.rstrip("/")
        try:
            # No listings cache: other processes (workers, Ray's uploads) write the same prefixes,
            # and a cached listing would hide their checkpoints.
            options = {"use_listings_cache": False} if is_remote(self.uri) else {}
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **options)
        except ImportError as exc:  # fsspec names the package a scheme needs
            extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(self.uri.split("://")[0], "")
            hint = f" (pip install 'trdpo[{extra}]')" if extra else ""
            raise StorageError(f"{self.uri}: {exc}{hint}") from None
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

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.path(*parts)))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def write_text(self, text: str, *parts: str) -> None:
        """Whole or not at all: a local file is written beside and renamed; an object-store put
        is atomic by itself."""
        target = self.path(*parts)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, text.encode("utf-8"))

    def subdirs(self, *parts: str) -> list[str]:
        """Names of the directories directly under ``parts`` (empty when it does not exist)."""
        base = self.path(*parts)
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in self.fs.ls(base, detail=True) if e["type"] == "directory")

    def put_dir(self, local_dir: str | Path, *parts: str) -> None:
        """Copy a local directory's files to ``parts`` (created; existing files replaced)."""
        local_dir = Path(local_dir)
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            target = self.path(*parts, *file.relative_to(local_dir).parts)
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs.put_file(str(file), target)

    def get_dir(self, local_dir: str | Path, *parts: str) -> Path:
        """Copy the files under ``parts`` into ``local_dir`` (which is returned)."""
        local_dir = Path(local_dir)
        base = self.path(*parts)
        for name in self.fs.find(base):
            relative = posixpath.relpath(name, base)
            target = local_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(name, str(target))
        return local_dir

    def remove(self, *parts: str) -> None:
        target = self.path(*parts)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def check_writable(self) -> None:
        """Write and delete a probe file: a read-only directory or a bucket without write access
        fails here, in one line, before anything starts."""
        probe = f".trdpo-write-probe-{os.getpid()}"
        try:
            self.write_text("ok", probe)
            self.remove(probe)
        except (OSError, PermissionError) as exc:
            raise StorageError(f"cannot write to {self.uri} ({type(exc).__name__}: {exc})") from None

    def pyarrow(self):
        """``(pyarrow file system, path)`` for Ray's ``storage_filesystem`` / ``storage_path``."""
        import pyarrow.fs

        if self.local:
            return pyarrow.fs.LocalFileSystem(), self.root
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs)), self.root


class StorageError(UserFacingError, OSError):
    """A store that cannot be used (unwritable, unreachable); the message names it."""


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
    with FileLock(str(target) + ".lock"):  # the ranks of one machine copy once
        manifest_path = target / ".trdpo-manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        for remote in store.fs.find(store.root, detail=True).values():
            relative = posixpath.relpath(remote["name"], store.root)
            if relative.endswith(WEIGHT_FILES) and not weights:
                continue
            stamp = f"{remote.get('size')}:{remote.get('ETag') or remote.get('mtime') or remote.get('LastModified')}"
            local = target / relative
            if manifest.get(relative) != stamp or not local.exists():
                local.parent.mkdir(parents=True, exist_ok=True)
                store.fs.get_file(remote["name"], str(local))
                manifest[relative] = stamp
        manifest_path.write_text(json.dumps(manifest))
    return str(target)
