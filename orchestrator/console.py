"""The console is for people: trdpo's own lines there, Ray's internals in the run's log file.

Everything trdpo says is a labelled line (``[trdpo] stage sft``, ``[demo-soft] step 40/120 ...``,
``[eval] ...``), printed by the driver or by a Ray worker. Ray relays each worker's output to
the driver and adds its own chatter: Train's resource requests, worker-group start and per-report
``TrainingReport(...)`` dumps, C++ core-worker lines, the raylet's scheduling warnings, INFO and
WARNING records of its driver-side loggers. By default (quiet):

    relayed line with trdpo's label, from a worker           -> console, without Ray's "(pid=...)" prefix
    any other relayed line (Ray's own processes and chatter,
      a worker's library warnings, its traceback)            -> the log file only
    driver-side "ray" records below ERROR, "mlflow" below
      WARNING                                                -> the log file only

Every relayed line and every captured record goes to the log file, which the console names once
(``[trdpo] Ray's messages: PATH (...)``) and every top-level MLflow run gets as the artifact
``logs/<file>``. A failing worker's error still reaches the console: Ray raises it in the driver,
where the CLI prints it (one line for a user's mistake, the traceback for a bug).

``trdpo --verbose ...`` or ``TRDPO_VERBOSE=1`` shows everything, as Ray would. The log file lives
in ``$TRDPO_LOG_DIR``, else ``<temp dir>/trdpo-logs``: one file per process; the newest
``$TRDPO_LOG_KEEP`` (100) of trdpo's files there are kept, older ones deleted as a new one starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

VERBOSE_ENV = "TRDPO_VERBOSE"
LOG_DIR_ENV = "TRDPO_LOG_DIR"
LOG_KEEP_ENV = "TRDPO_LOG_KEEP"
# The names LogFile gives: only these are ever pruned, never a user's own files in $TRDPO_LOG_DIR.
LOG_NAME = re.compile(r"^\d{8}-\d{6}-\d+\.log$")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def as_typed(program: str) -> str:
    """``program``, a command this package's environment installs (``trdpo``, ``mlflow``), as the
    user can type it in the shell that ran us: the bare name when PATH finds this environment's
    copy, else its path. ``make demo`` runs ``.venv/bin/trdpo`` without the venv on PATH, and the
    commands its closing lines suggest must work when pasted."""
    import shlex
    import shutil

    ours = Path(sys.executable).parent / program
    if not ours.is_file():
        return program  # not installed as a script beside this interpreter: nothing better to name
    found = shutil.which(program)
    if found and os.path.samefile(found, ours):
        return program
    relative = os.path.relpath(ours)
    return shlex.quote(str(ours) if relative.startswith("..") else relative)


# Processes Ray runs for itself: nothing they print is trdpo's.
RAY_PROCESSES = frozenset({
    "TrainController", "PlacementGroupCleaner", "PreemptionWatcher", "SynchronizationActor", "DatasetManager",
    "_AutoscalingCoordinatorActor", "raylet", "autoscaler", "gcs_server",
})

# Lines of Ray's that look like trdpo's "[label] ..." (C++ and abseil log lines).
RAY_BRACKETED = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+ [DIWEF] \d+ \d+\] |^\[[\w./-]+\.(?:cc|h) ?: ?\d+\] ")

# trdpo's own lines: "[trdpo] ...", "[demo-soft-a0.6-t4] step 3/12 ...", "[judge p vs sft [hh]] 4/8 ...".
TRDPO_LINE = re.compile(r"^\[[^\[\]]+(?:\[[^\[\]]*\][^\[\]]*)*\] ")


def source_of(batch: dict) -> str:
    return str(batch.get("actor_name") or batch.get("task_name") or batch.get("pid") or "?")


def is_trdpo_line(batch: dict, line: str) -> bool:
    """A relayed line that trdpo printed (and may be shown without Ray's prefix)."""
    return (source_of(batch) not in RAY_PROCESSES and batch.get("pid") not in RAY_PROCESSES
            and bool(TRDPO_LINE.match(line)) and not RAY_BRACKETED.match(line))


def prune_logs(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` of trdpo's log files in ``directory`` (by modification
    time). Another process may prune at the same moment: a file already gone is no error."""
    logs = []
    for path in directory.iterdir():
        if LOG_NAME.match(path.name):
            with contextlib.suppress(FileNotFoundError):
                logs.append((path.stat().st_mtime, path.name, path))
    for _, _, path in sorted(logs, reverse=True)[max(keep, 1):]:
        path.unlink(missing_ok=True)


class LogFile:
    """The process's log file, created on first use; lines are written whole and flushed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._path: Path | None = None
        self._handle = None

    @property
    def path(self) -> Path:
        with self._lock:
            return self._open()

    def _open(self) -> Path:
        if self._path is None:
            directory = Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "trdpo-logs")
            directory.mkdir(parents=True, exist_ok=True)
            self._path = directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            self._handle = self._path.open("a", encoding="utf-8")
            prune_logs(directory, keep=int(os.environ.get(LOG_KEEP_ENV, "100")))
        return self._path

    def written(self) -> Path | None:
        """The file, if it exists (written to, or named on the console)."""
        with self._lock:
            return self._path

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        stamp = time.strftime("%H:%M:%S")
        with self._lock:
            self._open()
            self._handle.write("".join(f"{stamp} {line}\n" for line in lines))
            self._handle.flush()


LOG = LogFile()


def route(batch: dict, show) -> None:
    """Where one batch of relayed output goes (see the module docstring); ``show`` prints a
    batch as Ray would. Runs on Ray's relay thread, which must never die of it: a log file that
    cannot be written loses the file's copy, never the console's."""
    lines = [line for line in batch.get("lines", []) if line is not None]
    prefix = f"({source_of(batch)} pid={batch.get('pid')}) " if batch.get("pid") not in ("raylet", "autoscaler") \
        else f"({batch.get('pid')}) "
    try:
        LOG.write([prefix + line for line in lines])
    except OSError:
        pass
    if verbose():
        show(batch)
        return
    mine = [line for line in lines if is_trdpo_line(batch, line)]
    if mine:
        stream = sys.stderr if batch.get("is_err") else sys.stdout
        print("\n".join(mine), file=stream, flush=True)


class _FileHandler(logging.Handler):
    """Library records into the log file (every level the logger lets through)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            LOG.write([f"[{record.name}] {record.levelname}: {record.getMessage()}"])
        except OSError:  # a log file that cannot be written loses its copy; the program goes on
            pass
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


class _QuietFilter(logging.Filter):
    """On a library's console handler: below ``level`` only with --verbose."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or verbose()


# Driver-side loggers whose console handlers are quieted, and the lowest level still shown.
QUIET_LOGGERS = {"ray": logging.ERROR, "mlflow": logging.WARNING}


def capture_library_logs() -> None:
    """Quiet the console handlers that Ray and MLflow installed (once each) and send their records
    to the log file. Call it after importing them and before they start talking."""
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(h, _FileHandler) for h in logger.handlers):
            logger.addHandler(_FileHandler())
        for handler in logger.handlers:
            if not isinstance(handler, _FileHandler) and not any(isinstance(f, _QuietFilter) for f in handler.filters):
                handler.addFilter(_QuietFilter(level))


def before_ray_init() -> None:
    """Route what Ray will relay to this driver through :func:`route`; quiet its loggers."""
    from orchestrator.compat import route_relayed_output

    route_relayed_output(route)
    capture_library_logs()


_announced: set[str] = set()


def announce(ray_logs: str | None) -> None:
    """Name the log file on the console, once per process and Ray session."""
    key = ray_logs or ""
    if key in _announced:
        return
    _announced.add(key)
    where = f"; Ray's own logs: {ray_logs}" if ray_logs else ""
    shown = "shown here too (--verbose)" if verbose() else "--verbose shows them here"
    try:
        path = LOG.path
    except OSError as exc:
        print(f"[trdpo] Ray's messages: not kept, the log file cannot be written ({exc}{where})", flush=True)
        return
    print(f"[trdpo] Ray's messages: {path} ({shown}{where})", flush=True)
