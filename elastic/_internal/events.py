"""The run's events: their vocabulary (each declared once), the log at URI/events.jsonl, its reader
and its one-line format.

Every event is a JSON object on its own line with `event` (a name below) and `time` (Unix seconds),
plus the fields its declaration lists. Operators, the CLI (`elastic events`), the progress printer,
the chaos tool and the chaos suite all read events through this module. Backends that can append
(local files, memory) get one line appended per event; object stores (no append) get rolling
segments (elastic._internal.jsonlog), flushed at most once per `flush_interval_s`, and always on close.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import time
from typing import Any

from elastic._internal import jsonlog
from elastic._internal.jsonlog import JsonLinesLog
from elastic._internal.storage import RunLocation

EVENTS_NAME = "events"
EVENTS_FILE = f"{EVENTS_NAME}.jsonl"


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
                "peer:R, buddy, replica or checkpoint:STEP; model_kept: a survivor loaded it into the "
                "sharded model it kept; rehearsed: a promoted standby had rehearsed the optimizer step)",
                ("step", "source", "generation", "lost_steps", "model_kept", "rehearsed", "worker", "rank", "pid"),
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
    WORKER_LEFT = ("worker_left", "a worker left gracefully (preemption, or handing a crowded node over): not a failure",
                   ("worker", "rank", "pid", "node_id", "reason"), True)
    WAITING_FOR_WORKERS = ("waiting_for_workers", "fewer than min_workers are available: waiting (bounded)",
                           ("have", "need"), True)
    RECOVERED = ("recovered", "training recovered from a failure: the group completed a step beyond the newest "
                 "step before it (seconds: from the failure to the first step after the restore; cost_s: to "
                 "this step, what the failure cost; ettr: the run's effective training time ratio so far)",
                 ("reason", "seconds", "lost_steps", "generation", "world_size", "failure", "cost_s", "ettr"), True)
    RESIZED = ("resized", "training went on beyond the newest step before a membership change that was not a "
               "failure (fields as for recovered; a resize's cost is not counted against the ETTR)",
               ("reason", "seconds", "lost_steps", "generation", "world_size", "failure", "cost_s", "ettr"), True)
    RUN_STOPPED = ("run_stopped", "the driver was asked to stop (SIGINT/SIGTERM): the group committed the "
                   "newest state it held and the run ended (exit 128 + signal)",
                   ("signal", "step", "committed_step", "committed", "seconds"), True)
    RUN_FINISHED = ("run_finished", "the run ended: every step done and the final state committed (lost_s: "
                    "the seconds failures cost, overlaps counted once; ettr: the share of the time since the "
                    "first step that they did not cost)",
                    ("steps", "error", "seconds", "failures", "recoveries", "lost_s", "ettr"), True)
    RUN_FAILED = ("run_failed", "the run ended without finishing (the error says why; lost_s and ettr as for "
                  "run_finished)", ("steps", "error", "seconds", "failures", "recoveries", "lost_s", "ettr"), True)

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


class EventLog(JsonLinesLog):
    """URI/events.jsonl (or its segments on object stores): see elastic._internal.jsonlog."""

    def __init__(self, where: str | RunLocation, *, flush_interval_s: float = 1.0, fs: Any = None,
                 append: bool | None = None):
        super().__init__(where, EVENTS_NAME, flush_interval_s=flush_interval_s, fs=fs, append=append,
                         keep=MEMORY_EVENTS)

    @property
    def events(self) -> list[dict[str, Any]]:
        """The most recent events (up to MEMORY_EVENTS), oldest first."""
        return list(self.recent)

    def emit(self, event: Event | str, **fields: Any) -> dict[str, Any]:
        record = make(event, **fields)
        self.record(record)
        return record


def read_lines(uri: str, *, partial: bool = False) -> list[str]:
    """Every line of a run's event log, oldest first (see elastic._internal.jsonlog.read_lines)."""
    return jsonlog.read_lines(uri, EVENTS_NAME, partial=partial)


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


if __name__ == "__main__":  # `python -m elastic._internal.events`: the README's list of events
    print(markdown())
