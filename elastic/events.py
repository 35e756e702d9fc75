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
import threading
import time
from typing import Any

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

    def emit(self, event: Event | str, **fields: Any) -> dict[str, Any]:
        record = make(event, **fields)
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
    """Every complete event of a run, oldest first ([] when the run logged none yet)."""
    fs, root = resolve(uri)
    path = f"{root}/{EVENTS_FILE}"
    if not fs.exists(path):
        return []
    with fs.open(path, "rb") as f:
        text = f.read().decode(errors="replace")
    return parse_lines(text)


def parse_lines(text: str) -> list[dict[str, Any]]:
    # A live run may be appending right now: a last line without its newline is not written yet.
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
