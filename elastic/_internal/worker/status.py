"""What a worker reports to the supervisor's polls, shared between the training thread (which
writes it) and the actor thread (which reads it for poll()).

The status is an immutable record replaced as a whole under a lock, so a poll never sees half of
an update. Events and rank 0's per-step metrics wait in queues until the supervisor acknowledges
them: every item has a sequence number, an answer carries every item past the acknowledgement the
question came with, and only an acknowledged item is dropped. An answer lost on the way (a long
poll the supervisor stopped waiting for when it gave the worker a new generation) loses nothing:
the next answer carries the same items again, and the supervisor skips those it already has.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from elastic._internal.events import Event, make
from elastic._internal.protocol import ParkReason, Restored, WorkerError, WorkerState


@dataclass(frozen=True)
class Status:
    state: WorkerState = WorkerState.IDLE
    generation: int = -1
    step: int = -1
    metrics: dict[str, float] = field(default_factory=dict)
    failure: WorkerError | None = None
    park_reason: ParkReason | None = None
    last_progress: float = field(default_factory=time.monotonic)
    """Monotonic time of the last commit (or of the generation's start)."""
    committed_step: int = -1
    """The newest step a checkpoint this worker took part in committed (-1: none yet)."""
    restored: Restored | None = None
    """Where this worker's latest generation restarted from."""


MAX_RECORDS = 100_000
"""Per-step metrics records kept until acknowledged (the oldest go first if nobody collects them)."""
MAX_EVENTS = 10_000
"""Events kept until acknowledged (the oldest go first if nobody collects them)."""


@dataclass(frozen=True)
class Unsent:
    """Items not acknowledged yet: `events[i]` has sequence number `event_seq + i` (records alike)."""

    events: list[dict[str, Any]]
    event_seq: int
    records: list[tuple[int, float, dict[str, float]]]
    record_seq: int


PROGRESS_PUSH_S = 0.5
"""A watcher hears about new steps (and rank 0's metrics) at most this often; state changes, events
and failures at once."""


class StatusBoard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.version = 0
        """Bumped by every change a supervisor must hear at once (state, failure, events)."""
        self._status = Status()
        self._events: deque[dict[str, Any]] = deque()
        self._records: deque[tuple[int, float, dict[str, float]]] = deque()
        self._event_seq = 1  # the sequence number of _events[0] (of the next event when empty)
        self._record_seq = 1

    def get(self) -> Status:
        return self._status

    def update(self, **changes: Any) -> None:
        with self._lock:
            self._status = dataclasses.replace(self._status, **changes)
            self._bump()

    def _bump(self) -> None:
        self.version += 1
        self._changed.notify_all()

    def wait_change(self, version: int, step: int, timeout_s: float) -> int:
        """Block until something changed since (version, step) — at once for a state change or an
        event, after PROGRESS_PUSH_S for a new step — or `timeout_s` passed; the current version."""
        now = time.monotonic()
        deadline, progress_at = now + timeout_s, now + PROGRESS_PUSH_S
        with self._changed:
            while self.version == version:
                now = time.monotonic()
                if now >= deadline or (now >= progress_at and self._status.step != step):
                    break
                # Steps do not notify (they come every few ms): look again at progress_at, then
                # every tenth of a second.
                self._changed.wait(min(deadline - now, max(progress_at - now, 0.1)))
            return self.version

    def progress(self, step: int, metrics: dict[str, float] | None = None, *, merge: bool = False,
                 record: bool = False, restored: Restored | None = None) -> None:
        """A step was committed (or `restored`): progress is measured from now. `record`: keep this
        step's metrics for the run's metrics stream (rank 0 does)."""
        with self._lock:
            s = self._status
            new = s.metrics
            if metrics:
                fresh = {k: float(v) for k, v in metrics.items()}
                new = {**s.metrics, **fresh} if merge else fresh
                if record:
                    if len(self._records) >= MAX_RECORDS:
                        self._records.popleft()
                        self._record_seq += 1
                    self._records.append((step, time.time(), fresh))
            self._status = dataclasses.replace(s, step=step, metrics=new, last_progress=time.monotonic(),
                                               restored=restored or s.restored)
            if restored is not None:
                self._bump()

    def committed(self, step: int) -> None:
        """A checkpoint of `step` committed (the supervisor hears it at once)."""
        with self._lock:
            self._status = dataclasses.replace(self._status,
                                               committed_step=max(self._status.committed_step, step))
            self._bump()

    def emit(self, event: Event, **fields: Any) -> None:
        with self._lock:
            if len(self._events) >= MAX_EVENTS:
                self._events.popleft()
                self._event_seq += 1
            self._events.append(make(event, **fields))
            self._bump()

    def unsent(self, event_ack: int = 0, record_ack: int = 0) -> Unsent:
        """Drop the items up to these acknowledged sequence numbers; the rest, still kept."""
        with self._lock:
            self._event_seq = _drop_upto(self._events, self._event_seq, event_ack)
            self._record_seq = _drop_upto(self._records, self._record_seq, record_ack)
            return Unsent(list(self._events), self._event_seq, list(self._records), self._record_seq)

    def take_records(self) -> list[tuple[int, float, dict[str, float]]]:
        """Every record kept, acknowledged at once (a reader in the same process)."""
        with self._lock:
            records = list(self._records)
            self._record_seq = _drop_upto(self._records, self._record_seq, self._record_seq + len(records) - 1)
        return records

    def take_events(self) -> list[dict[str, Any]]:
        """Every event kept, acknowledged at once (a reader in the same process)."""
        with self._lock:
            events = list(self._events)
            self._event_seq = _drop_upto(self._events, self._event_seq, self._event_seq + len(events) - 1)
        return events


def _drop_upto(items: deque, first_seq: int, ack: int) -> int:
    """Drop the items numbered up to `ack` from the front of `items` (numbered from `first_seq`);
    the sequence number of the new front."""
    for _ in range(min(len(items), max(0, ack - first_seq + 1))):
        items.popleft()
        first_seq += 1
    return first_seq
