"""The run's event log: URI/events.jsonl, one JSON object per line with `event` and `time`.

Operators and chaos tools read it to follow a run and find worker PIDs. Backends that can append
(local files, memory) append one line per event; object stores (no append) get the whole log
rewritten, at most once per `flush_interval_s`, and always on close.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from elastic.storage import resolve

EVENTS_FILE = "events.jsonl"


class EventLog:
    def __init__(self, uri: str, *, flush_interval_s: float = 1.0):
        self.fs, root = resolve(uri)
        self.path = f"{root}/{EVENTS_FILE}"
        self.fs.makedirs(root, exist_ok=True)
        self._can_append = any(p in ("file", "local", "memory") for p in _protocols(self.fs))
        self._lines: list[str] = []
        self._unflushed = False
        self._last_flush = 0.0
        self._flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        if not self._can_append and self.fs.exists(self.path):
            with self.fs.open(self.path, "rb") as f:
                self._lines = f.read().decode().splitlines(keepends=True)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": fields.pop("time", time.time()), **fields}
        self.record(record)
        return record

    def record(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            self.events.append(record)
            if self._can_append:
                with self.fs.open(self.path, "ab") as f:
                    f.write(line.encode())
                return
            self._lines.append(line)
            self._unflushed = True
            if time.monotonic() - self._last_flush >= self._flush_interval_s:
                self._rewrite()

    def close(self) -> None:
        with self._lock:
            if self._unflushed:
                self._rewrite()

    def _rewrite(self) -> None:
        with self.fs.open(self.path, "wb") as f:
            f.write("".join(self._lines).encode())
        self._unflushed = False
        self._last_flush = time.monotonic()


def read_events(uri: str) -> list[dict[str, Any]]:
    fs, root = resolve(uri)
    path = f"{root}/{EVENTS_FILE}"
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        text = f.read().decode()
    # A live run may be appending right now: a last line without its newline is not written yet.
    lines = text.split("\n")
    complete = lines if text.endswith("\n") else lines[:-1]
    return [json.loads(line) for line in complete if line.strip()]


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
