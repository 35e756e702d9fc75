"""The run's events: their vocabulary (each declared once), the log at URI/events.jsonl, its reader
and its one-line format.

Every event is a JSON object on its own line with `event` (a name below) and `time` (Unix seconds),
plus the fields its declaration lists. Operators, the CLI (`elastic events`), the progress printer,
the chaos tool and the chaos suite all read events through this module. Backends that can append
(local files, memory) get one line appended per event; object stores (no append) get the whole log
rewritten, at most once per `flush_interval_s`, and always on close.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import logging
import threading
import time
from collections import deque
from typing import Any

from elastic import retry
from elastic.retry import RetryPolicy
from elastic.storage import resolve

EVENTS_FILE = "events.jsonl"


class Event(str, enum.Enum):
    """Every event a run records: name, what it means, its fields, whether progress shows it."""

    RUN_STARTED = ("run_started", "the supervisor started (or resumed) the run",
                   ("name", "uri", "supervisor_pid", "supervisor_node_id", "min_workers", "max_workers",
                    "resume_from_step", "cleaned_partial"), True)
    WORKER_STARTED = ("worker_started", "a worker process joined the run for the first time",
                      ("worker", "rank", "pid", "node_id", "generation", "background_startup"), False)
    GROUP_BUILT = ("group_built", "a new generation of the process group was formed",
                   ("generation", "world_size", "reason", "seconds", "members"), True)
    RESTORED = ("restored", "a rank loaded the newest committed state (source: fresh, memory, "
                "peer:R or checkpoint:STEP)", ("step", "source", "generation", "lost_steps", "worker", "rank", "pid"),
                True)
    CHECKPOINT_COMMITTED = ("checkpoint_committed", "a durable checkpoint was committed",
                            ("step", "seconds", "bytes", "world_size", "uri", "worker", "rank", "pid"), True)
    CHECKPOINT_FAILED = ("checkpoint_failed", "a checkpoint was not committed (storage refused it, a rank's "
                         "write failed, or it did not finish in time): the reason says which",
                         ("step", "reason", "worker", "rank", "pid"), True)
    PREEMPTION_NOTICE = ("preemption_notice", "a worker got SIGTERM (a spot VM's notice): the group commits "
                         "and lets it go at the next step boundary", ("pid", "worker", "rank"), True)
    NODE_DRAINING = ("node_draining", "Ray is draining the worker's node: treated as a preemption notice",
                     ("worker", "rank", "pid", "node_id"), False)
    GROUP_FAILED = ("group_failed", "the process group broke: a worker died, froze, hung or raised",
                    ("generation", "reason", "errors"), True)
    WORKER_FAILED = ("worker_failed", "a worker was removed as failed (counts against max_failures)",
                     ("worker", "rank", "pid", "node_id", "reason", "error"), True)
    WORKER_LEFT = ("worker_left", "a worker left gracefully (preemption): not a failure",
                   ("worker", "rank", "pid", "node_id", "reason"), True)
    WAITING_FOR_WORKERS = ("waiting_for_workers", "fewer than min_workers are available: waiting (bounded)",
                           ("have", "need"), True)
    RECOVERED = ("recovered", "training resumed after a failure",
                 ("reason", "seconds", "lost_steps", "generation", "world_size", "failure"), True)
    RESIZED = ("resized", "training resumed after a membership change that was not a failure",
               ("reason", "seconds", "lost_steps", "generation", "world_size", "failure"), True)
    RUN_STOPPED = ("run_stopped", "the driver was asked to stop (SIGINT/SIGTERM): the group committed the "
                   "newest state it held and the run ended (exit 128 + signal)",
                   ("signal", "step", "committed_step", "committed", "seconds"), True)
    RUN_FINISHED = ("run_finished", "the run ended: every step done and the final state committed",
                    ("steps", "error", "seconds", "failures", "recoveries"), True)
    RUN_FAILED = ("run_failed", "the run ended without finishing (the error says why)",
                  ("steps", "error", "seconds", "failures", "recoveries"), True)

    def __new__(cls, name: str, doc: str, fields: tuple[str, ...], shown: bool) -> "Event":
        obj = str.__new__(cls, name)
        obj._value_ = name
        obj.doc = doc  # type: ignore[attr-defined]
        obj.fields = fields  # type: ignore[attr-defined]
        obj.shown = shown  # type: ignore[attr-defined]
        return obj

    def __str__(self) -> str:
        return self.value


ENDED = (Event.RUN_FINISHED, Event.RUN_FAILED)
"""Events after which a run writes nothing more."""
MEMBERSHIP = (Event.WORKER_FAILED, Event.WORKER_LEFT)
"""Events that remove a worker from the newest group."""


def markdown() -> str:
    """The README's list of events, generated from the declarations above (a test keeps them equal)."""
    return "\n".join(f"- `{e.value}`: {e.doc} ({', '.join(e.fields)})" for e in Event)


def make(event: Event | str, **fields: Any) -> dict[str, Any]:
    """An event record: {"event": name, "time": now (or fields' time), **fields}."""
    return {"event": Event(event).value, "time": fields.pop("time", time.time()), **fields}


EVENT_SEGMENTS_DIR = "events"
MEMORY_EVENTS = 10_000
"""Events the supervisor keeps in memory (for progress and the Result); the log keeps them all."""
SEGMENT_LINES = 1_000
"""On object stores (no append) events go to segment files of at most this many lines; a flush
rewrites only the open segment, so its cost does not grow with the length of the run."""
MAX_PENDING = 100_000
"""Events kept while storage refuses them; beyond this the oldest are dropped (and counted)."""
EVENTS_WRITE = RetryPolicy(name="events_write", attempts=3, total_s=5.0, max_backoff_s=1.0)
"""Writing the event log: brief, so that a storage outage never stalls the supervisor."""

log = logging.getLogger(__name__)


class EventLog:
    """The writer: local files and memory get each line appended at once; object stores get rolling
    segments, flushed at most once per `flush_interval_s` and on close. A write that fails is kept
    and retried with the next one: the run goes on, and `write_errors` says how often storage
    refused (the supervisor reports it)."""

    def __init__(self, uri: str, *, flush_interval_s: float = 1.0, fs: Any = None, append: bool | None = None):
        """`append`: whether the store can append (None: local disk and memory can, through any
        fault-injecting wrapper; object stores cannot)."""
        resolved, root = resolve(uri)
        self.fs = fs if fs is not None else resolved
        self.uri = uri
        self.path = f"{root}/{EVENTS_FILE}"
        self.segments = f"{root}/{EVENT_SEGMENTS_DIR}"
        inner = getattr(self.fs, "inner_fs", self.fs)
        self._can_append = append if append is not None else \
            any(p in ("file", "local", "memory") for p in _protocols(inner))
        self._flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._segment: list[str] = []
        self._segment_no = 0
        self._last_flush = 0.0
        self.recent: deque[dict[str, Any]] = deque(maxlen=MEMORY_EVENTS)
        self.count = 0
        """Events recorded so far (the index the next one gets)."""
        self.write_errors = 0
        self.dropped = 0
        self._warned = False
        try:
            self.fs.makedirs(root if self._can_append else self.segments, exist_ok=True)
            if not self._can_append:
                self._segment_no = _next_segment(self.fs, self.segments)
        except Exception as exc:  # noqa: BLE001 - a log we cannot open yet is retried at each write
            self._failed(exc)

    @property
    def events(self) -> list[dict[str, Any]]:
        """The most recent events (up to MEMORY_EVENTS), oldest first."""
        return list(self.recent)

    def since(self, index: int) -> list[dict[str, Any]]:
        """Events recorded at or after `index` that are still in memory."""
        first = self.count - len(self.recent)
        return list(self.recent)[max(0, index - first):]

    def emit(self, event: Event | str, **fields: Any) -> dict[str, Any]:
        record = make(event, **fields)
        self.record(record)
        return record

    def record(self, record: dict[str, Any]) -> None:
        raw = json.dumps(record, default=str)
        line = retry.redact(raw) + "\n"  # credentials in URIs or messages never reach the log
        if len(line) != len(raw) + 1:
            record = json.loads(line)
        with self._lock:
            self.recent.append(record)
            self.count += 1
            self._pending.append(line)
            if len(self._pending) > MAX_PENDING:
                self.dropped += len(self._pending) - MAX_PENDING
                del self._pending[: len(self._pending) - MAX_PENDING]
            if self._can_append or time.monotonic() - self._last_flush >= self._flush_interval_s:
                self._flush()

    def close(self) -> None:
        with self._lock:
            if self._pending:
                self._flush()

    def _flush(self) -> None:
        try:
            if self._can_append:
                data = "".join(self._pending).encode()
                retry.call(EVENTS_WRITE, lambda: self._append(data), op="append event", uri=self.uri)
            else:
                lines = self._segment + self._pending
                path = f"{self.segments}/{self._segment_no:08d}.jsonl"
                data = "".join(lines).encode()
                retry.call(EVENTS_WRITE, lambda: self.fs.pipe_file(path, data), op="write events", uri=self.uri)
                self._segment = lines
                if len(self._segment) >= SEGMENT_LINES:
                    self._segment, self._segment_no = [], self._segment_no + 1
            self._pending = []
            self._last_flush = time.monotonic()
            if self._warned:
                log.warning("event log %s is writable again", retry.redact(self.uri))
                self._warned = False
        except Exception as exc:  # noqa: BLE001 - the log must never stop the run
            self._failed(exc)

    def _append(self, data: bytes) -> None:
        with self.fs.open(self.path, "ab") as f:
            f.write(data)

    def _failed(self, exc: BaseException) -> None:
        self.write_errors += 1
        self._last_flush = time.monotonic()  # do not hammer a storage that just refused
        if not self._warned:
            self._warned = True
            log.warning("cannot write the event log %s (%s): the run goes on; events are kept and written "
                        "when storage takes them", retry.redact(self.uri), retry.redact(f"{type(exc).__name__}: {exc}"))


def _next_segment(fs: Any, segments: str) -> int:
    try:
        names = fs.ls(segments, detail=False)
    except FileNotFoundError:
        return 0
    nums = [int(n.rsplit("/", 1)[-1][:-6]) for n in names if n.endswith(".jsonl") and n.rsplit("/", 1)[-1][:-6].isdigit()]
    return max(nums) + 1 if nums else 0


def read_lines(uri: str, *, partial: bool = False) -> list[str]:
    """Every line of a run's event log, oldest first: events.jsonl, then the segments an object
    store holds, as one stream. [] when the run logged nothing. A last line without its newline
    is still being written: left out unless `partial`."""
    fs, root = resolve(uri)
    texts = []
    try:
        texts.append(fs.cat_file(f"{root}/{EVENTS_FILE}").decode(errors="replace"))
    except FileNotFoundError:
        pass
    try:
        fs.invalidate_cache(f"{root}/{EVENT_SEGMENTS_DIR}")  # s3fs caches listings
        segs = sorted(n for n in fs.ls(f"{root}/{EVENT_SEGMENTS_DIR}", detail=False) if n.endswith(".jsonl"))
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


def read_events(uri: str) -> list[dict[str, Any]]:
    """Every complete event of a run, oldest first ([] when the run logged none yet)."""
    return parse_lines("".join(line + "\n" for line in read_lines(uri)))


def parse_lines(text: str) -> list[dict[str, Any]]:
    """The events in `text` (JSON lines); a last line without its newline (still being written)
    and lines that do not parse (torn) are left out, never guessed."""
    lines = text.split("\n")
    complete = lines if text.endswith("\n") else lines[:-1]
    out = []
    for line in complete:
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue  # a torn line (an object store rewritten mid-read): skip, never guess
        if isinstance(doc, dict):
            out.append(doc)
    return out


def live_members(events: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    """(generation, members still in it) of the newest group: its members minus the workers that
    failed or left since it was built. (-1, []) before the first group."""
    built = [i for i, e in enumerate(events) if e.get("event") == Event.GROUP_BUILT]
    if not built:
        return -1, []
    i = built[-1]
    gone = {e.get("worker") for e in events[i:] if e.get("event") in MEMBERSHIP}
    return events[i]["generation"], [m for m in events[i]["members"] if m["worker"] not in gone]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return v if v and not any(c.isspace() for c in v) else json.dumps(v)
    return json.dumps(v, separators=(",", ":"), default=str)


_BRIEF_HIDDEN = ("members", "uri", "node_id")


def format_event(ev: dict[str, Any], *, brief: bool = False) -> str:
    """One line: `12:00:01.123  worker_failed  rank=1 pid=123 ...` (local time).

    brief (the progress printer): no milliseconds, no member lists, URIs or node ids, an error's last
    line only, and a group's PIDs instead of its members.
    """
    t = ev.get("time")
    name = ev.get("event", "?")
    fields = {k: v for k, v in ev.items() if k not in ("event", "time")}
    if brief:
        fields = {k: v for k, v in fields.items() if k not in _BRIEF_HIDDEN and v is not None}
        if isinstance(fields.get("error"), str) and fields["error"].strip():
            fields["error"] = fields["error"].strip().splitlines()[-1]
        if name == Event.GROUP_BUILT:
            fields["pids"] = [m.get("pid") for m in ev.get("members", [])]
    if isinstance(t, (int, float)):
        stamp = _dt.datetime.fromtimestamp(t).strftime("%H:%M:%S" if brief else "%H:%M:%S.%f")
        stamp = stamp if brief else stamp[:-3]
    else:
        stamp = "??:??:??" if brief else "??:??:??.???"
    text = " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items())
    if brief:
        return f"[elastic {stamp}] {name:<20} {text}".rstrip()
    return f"{stamp}  {name}  {text}".rstrip()


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


if __name__ == "__main__":  # `python -m elastic.events`: the README's list of events
    print(markdown())
