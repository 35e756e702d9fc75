"""What a worker reports to the supervisor's polls, shared between the training thread (which
writes it) and the actor thread (which reads it for poll()).

The status is an immutable record replaced as a whole under a lock, so a poll never sees half of
an update; events and rank 0's per-step metrics wait in queues until the next poll collects them.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from elastic.events import Event, make
from elastic.worker.protocol import ParkReason, WorkerError, WorkerState


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


MAX_RECORDS = 100_000
"""Per-step metrics records kept between polls (the oldest go first if nobody collects them)."""


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
        self._events: list[dict[str, Any]] = []
        self._records: deque[tuple[int, float, dict[str, float]]] = deque(maxlen=MAX_RECORDS)

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
                 record: bool = False) -> None:
        """A step was committed (or restored): progress is measured from now. `record`: keep this
        step's metrics for the run's metrics stream (rank 0 does)."""
        with self._lock:
            s = self._status
            new = s.metrics
            if metrics:
                fresh = {k: float(v) for k, v in metrics.items()}
                new = {**s.metrics, **fresh} if merge else fresh
                if record:
                    self._records.append((step, time.time(), fresh))
            self._status = dataclasses.replace(s, step=step, metrics=new, last_progress=time.monotonic())

    def emit(self, event: Event, **fields: Any) -> None:
        with self._lock:
            self._events.append(make(event, **fields))
            self._bump()

    def take_records(self) -> list[tuple[int, float, dict[str, float]]]:
        with self._lock:
            records = list(self._records)
            self._records.clear()
        return records

    def take_events(self) -> list[dict[str, Any]]:
        with self._lock:
            events, self._events = self._events, []
        return events
