"""Judgment cache: every judgment stored by content in SQLite, so nothing is paid for twice.

The key hashes everything that could change the answer: backend, judge model, prompt-template
version, decoding parameters, the prompt, both responses *in presentation order*. The raw judge
output is kept, so verdicts can be re-parsed when the parser improves. Failed calls (API errors)
and answers with no verdict are not stored: a rerun asks exactly those again. Several actors share one file safely (WAL mode,
a busy timeout, one connection per process).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
create table if not exists judgments (
    key text primary key,
    backend text, model text, template_version text, decoding text,
    prompt text, response_a text, response_b text,
    raw_output text, usage text, latency_s real, created_at real
)
"""


@dataclass(frozen=True)
class CachedJudgment:
    raw_output: str
    usage: dict
    latency_s: float


def judgment_key(backend: str, model: str | None, template_version: str, decoding: dict, prompt: str, response_a: str, response_b: str) -> str:
    payload = json.dumps([backend, model, template_version, decoding, prompt, response_a, response_b], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgmentCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Several actors open the file at once; switching to WAL needs a moment alone with it.
        for attempt in range(100):
            try:
                conn = self._connection()
                if conn.execute("pragma journal_mode").fetchone()[0] != "wal":
                    conn.execute("pragma journal_mode=wal")
                conn.execute(SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05 + 0.01 * attempt)

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("pragma busy_timeout=30000")
            self._local.conn = conn
        return conn

    def __getstate__(self) -> dict:  # actors get the path, not the connection
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path, self._local = state["path"], threading.local()

    def get(self, key: str) -> CachedJudgment | None:
        row = self._connection().execute("select raw_output, usage, latency_s from judgments where key = ?", (key,)).fetchone()
        return CachedJudgment(row[0], json.loads(row[1] or "{}"), row[2] or 0.0) if row else None

    def put(self, key: str, *, backend: str, model: str | None, template_version: str, decoding: dict, prompt: str,
            response_a: str, response_b: str, raw_output: str, usage: dict, latency_s: float) -> None:
        self._connection().execute(
            "insert or replace into judgments values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, backend, model, template_version, json.dumps(decoding, sort_keys=True), prompt, response_a, response_b,
             raw_output, json.dumps(usage), latency_s, time.time()),
        )

    def __len__(self) -> int:
        return self._connection().execute("select count(*) from judgments").fetchone()[0]
