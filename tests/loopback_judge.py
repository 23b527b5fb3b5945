"""A loopback OpenAI-compatible judge server that injects faults: for tests and benchmarks.

    server = LoopbackJudge(latency_s=0.05, faults={"429": 0.1, "500": 0.05, "timeout": 0.02,
                                                   "drop": 0.02, "malformed": 0.05, "truncated": 0.025}, seed=0)
    server.start(); ... base_url=server.base_url ...; server.stop()

Faults: ``429`` (with Retry-After), ``500``, ``timeout`` (sleeps ``timeout_sleep_s``), ``drop``
(closes the connection without a reply), ``malformed`` (a well-formed reply whose text holds no
verdict) and ``truncated`` (a 200 ``application/json`` reply whose body is cut in half, with a
matching Content-Length, so the client gets the whole of a body that is not JSON).

It "judges" by a fixed rule (the response with more occurrences of ``prefer_word`` wins; equal
counts are a tie), so tests know the right answer. Faults are drawn per request from a seeded
generator; ``calls`` counts every request that reached it. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackJudge:
    def __init__(self, latency_s: float = 0.0, faults: dict[str, float] | None = None, seed: int = 0,
                 timeout_sleep_s: float = 2.0, prefer_word: str = "good", retry_after_s: float = 0.05):
        self.latency_s, self.faults, self.timeout_sleep_s = latency_s, dict(faults or {}), timeout_sleep_s
        self.prefer_word, self.retry_after_s = prefer_word, retry_after_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.calls = 0
        self.first_request_at: float | None = None  # perf_counter of the first and last requests:
        self.last_response_at: float | None = None  # the server-side window for throughput
        self.fault_counts: dict[str, int] = {}
        self.authorization_headers: list[str] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _draw_fault(self) -> str | None:
        with self.lock:
            self.calls += 1
            if self.first_request_at is None:
                self.first_request_at = time.perf_counter()
            u, edge = self.rng.random(), 0.0
            for name, rate in self.faults.items():
                edge += rate
                if u < edge:
                    self.fault_counts[name] = self.fault_counts.get(name, 0) + 1
                    return name
        return None

    def verdict(self, user_message: str) -> str:
        a = re.search(r"\[(?:Response|Summary) A\]\n(.*?)\n\n\[(?:Response|Summary) B\]", user_message, re.S)
        b = re.search(r"\[(?:Response|Summary) B\]\n(.*?)\n\n(?:Which|$)", user_message, re.S)
        count = lambda m: m.group(1).split().count(self.prefer_word) if m else 0  # noqa: E731
        ca, cb = count(a), count(b)
        return "[[A]]" if ca > cb else "[[B]]" if cb > ca else "[[C]]"

    def start(self) -> "LoopbackJudge":
        judge = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True  # else Nagle + delayed ACK add ~40 ms per request
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with judge.lock:
                    judge.authorization_headers.append(self.headers.get("Authorization", ""))
                fault = judge._draw_fault()
                if judge.latency_s:
                    time.sleep(judge.latency_s)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "timeout":
                    time.sleep(judge.timeout_sleep_s)
                if fault in ("429", "500"):
                    payload = json.dumps({"error": {"message": fault, "type": "injected"}}).encode()
                    self.send_response(int(fault))
                    if fault == "429":
                        self.send_header("Retry-After", str(judge.retry_after_s))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
                content = "Both have merits; I cannot say." if fault == "malformed" else f"Reasoning... {judge.verdict(user)}"
                payload = json.dumps({
                    "id": "cmpl-loopback", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", "x"),
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": len(user.split()), "completion_tokens": len(content.split()),
                              "total_tokens": len(user.split()) + len(content.split())},
                }).encode()
                if fault == "truncated":  # a 200 JSON reply cut short (a proxy or server dying mid-body)
                    payload = payload[: len(payload) // 2]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                judge.last_response_at = time.perf_counter()

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # dropped connections are the point, not news

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "LoopbackJudge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
