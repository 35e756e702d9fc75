"""Append-only JSON-lines logs kept at a run's location: URI/events.jsonl (elastic._internal.events) and
URI/metrics.jsonl (every committed step's metrics).

Local files and memory get each line appended at once. Object stores cannot append: they get
rolling segments URI/NAME/00000000.jsonl, ... of at most SEGMENT_LINES lines, and a flush rewrites
only the open segment, so its cost does not grow with the length of the run. Readers see the file
and the segments as one stream, oldest first.

A write that storage refuses is kept and retried with the next one (bounded: MAX_PENDING): the run
goes on, and `write_errors` says how often storage refused.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

from elastic._internal import retry
from elastic._internal.retry import RetryPolicy
from elastic._internal.storage import RunLocation, resolve

SEGMENT_LINES = 1_000
"""On object stores, lines per segment file (the most a flush rewrites)."""
MAX_PENDING = 100_000
"""Lines kept while storage refuses them; beyond this the oldest are dropped (and counted)."""
LOG_WRITE = RetryPolicy(name="log_write", attempts=3, total_s=5.0, max_backoff_s=1.0)
"""Writing a log: brief, so that a storage outage never stalls the supervisor."""

log = logging.getLogger(__name__)


class JsonLinesLog:
    def __init__(self, where: str | RunLocation, name: str, *, flush_interval_s: float = 1.0, fs: Any = None,
                 append: bool | None = None, keep: int = 0):
        """`append`: whether the store can append (None: local disk and memory can, through any
        fault-injecting wrapper; object stores cannot). `keep`: records kept in memory (`recent`)."""
        location = RunLocation.of(where)
        root = location.root
        self.fs = fs if fs is not None else location.fs
        self.uri = location.uri
        self.name = name
        self.path = f"{root}/{name}.jsonl"
        self.segments = f"{root}/{name}"
        inner = getattr(self.fs, "inner_fs", self.fs)
        self._can_append = append if append is not None else \
            any(p in ("file", "local", "memory") for p in _protocols(inner))
        self._flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._segment: list[str] = []
        self._segment_no = 0
        self._last_flush = 0.0
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self.count = 0
        """Records written so far (the index the next one gets)."""
        self.write_errors = 0
        self.dropped = 0
        self._warned = False
        try:
            self.fs.makedirs(root if self._can_append else self.segments, exist_ok=True)
            if not self._can_append:
                self._segment_no = _next_segment(self.fs, self.segments)
        except Exception as exc:  # noqa: BLE001 - a log we cannot open yet is retried at each write
            self._failed(exc)

    def since(self, index: int) -> list[dict[str, Any]]:
        """Records written at or after `index` that are still in memory."""
        with self._lock:
            first = self.count - len(self.recent)
            return list(self.recent)[max(0, index - first):]

    def record(self, record: dict[str, Any]) -> None:
        self.extend([record])

    def extend(self, records: list[dict[str, Any]]) -> None:
        """Log these records (one write for all of them where the store appends)."""
        if not records:
            return
        lines = []
        for i, rec in enumerate(records):
            raw = json.dumps(rec, default=str)
            line = retry.redact(raw) + "\n"  # credentials in URIs or messages never reach the log
            if len(line) != len(raw) + 1:
                records[i] = json.loads(line)
            lines.append(line)
        with self._lock:
            self.recent.extend(records)
            self.count += len(records)
            self._pending.extend(lines)
            if len(self._pending) > MAX_PENDING:
                self.dropped += len(self._pending) - MAX_PENDING
                del self._pending[: len(self._pending) - MAX_PENDING]
            if self._can_append or time.monotonic() - self._last_flush >= self._flush_interval_s:
                self._flush()

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._flush()

    close = flush

    def _flush(self) -> None:
        try:
            if self._can_append:
                data = "".join(self._pending).encode()
                retry.call(LOG_WRITE, lambda: self._append(data), op=f"append to {self.name} log", uri=self.uri)
            else:
                lines = self._segment + self._pending
                path = f"{self.segments}/{self._segment_no:08d}.jsonl"
                data = "".join(lines).encode()
                retry.call(LOG_WRITE, lambda: self.fs.pipe_file(path, data), op=f"write {self.name} log", uri=self.uri)
                self._segment = lines
                if len(self._segment) >= SEGMENT_LINES:
                    self._segment, self._segment_no = [], self._segment_no + 1
            self._pending = []
            self._last_flush = time.monotonic()
            if self._warned:
                log.warning("the %s log at %s is writable again", self.name, retry.redact(self.uri))
                self._warned = False
        except Exception as exc:  # noqa: BLE001 - a log must never stop the run
            self._failed(exc)

    def _append(self, data: bytes) -> None:
        with self.fs.open(self.path, "ab") as f:
            f.write(data)

    def _failed(self, exc: BaseException) -> None:
        self.write_errors += 1
        self._last_flush = time.monotonic()  # do not hammer a storage that just refused
        if not self._warned:
            self._warned = True
            log.warning("cannot write the %s log at %s (%s): the run goes on; lines are kept and written when "
                        "storage takes them", self.name, retry.redact(self.uri),
                        retry.redact(f"{type(exc).__name__}: {exc}"))


def _next_segment(fs: Any, segments: str) -> int:
    try:
        names = fs.ls(segments, detail=False)
    except FileNotFoundError:
        return 0
    nums = [int(n.rsplit("/", 1)[-1][:-6]) for n in names if n.endswith(".jsonl") and n.rsplit("/", 1)[-1][:-6].isdigit()]
    return max(nums) + 1 if nums else 0


def read_lines(uri: str, name: str, *, partial: bool = False) -> list[str]:
    """Every line of a run's NAME log, oldest first: NAME.jsonl, then the segments an object store
    holds, as one stream. [] when there is none. A last line without its newline is still being
    written: left out unless `partial`."""
    fs, root = resolve(uri)
    texts = []
    try:
        texts.append(fs.cat_file(f"{root}/{name}.jsonl").decode(errors="replace"))
    except FileNotFoundError:
        pass
    try:
        fs.invalidate_cache(f"{root}/{name}")  # s3fs caches listings
        segs = sorted(n for n in fs.ls(f"{root}/{name}", detail=False) if n.endswith(".jsonl"))
    except FileNotFoundError:
        segs = []
    for s in segs:
        try:
            texts.append(fs.cat_file(s).decode(errors="replace"))
        except FileNotFoundError:
            continue
    lines: list[str] = []
    for t in texts:
        parts = t.split("\n")
        # A live run may be appending right now: a last line without its newline is not written yet.
        lines += [x for x in (parts if t.endswith("\n") or partial else parts[:-1]) if x.strip()]
    return lines


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
