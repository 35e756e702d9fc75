"""Pure decisions: given what the workers answered and the clock, what should happen next.

Nothing here touches an actor or sleeps, so every branch is unit-testable with made-up polls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elastic.config import FailureConfig
from elastic.worker.protocol import WorkerPoll

DEAD = "dead"
UNRESPONSIVE = "unresponsive"


@dataclass(frozen=True)
class Health:
    """The members of a generation sorted by what their last poll said."""

    running: tuple[int, ...] = ()
    parked: tuple[int, ...] = ()
    finished: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()  # user code raised
    fatal: tuple[int, ...] = ()  # bad input: retrying cannot help
    dead: tuple[int, ...] = ()
    unresponsive: tuple[int, ...] = ()
    hung: tuple[int, ...] = ()  # answers polls, but no step progress for hang_timeout_s
    preempted: tuple[int, ...] = ()  # got a preemption notice (running or parked): leaving on purpose
    paused: tuple[int, ...] = ()  # parked at an agreed step boundary (not because the group broke)
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def lost(self) -> tuple[int, ...]:
        """Workers that must be removed and count as a failure."""
        return tuple(sorted(set(self.dead) | set(self.unresponsive) | set(self.hung) | set(self.failed)))

    @property
    def alive(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.running) | set(self.parked) | set(self.finished)))


def classify(polls: dict[int, WorkerPoll | str], failure: FailureConfig) -> Health:
    buckets: dict[str, list[int]] = {k: [] for k in
                                     ("running", "parked", "finished", "failed", "fatal", "dead", "unresponsive", "hung", "preempted",
                                      "paused")}
    errors: dict[int, str] = {}
    for wid, poll in sorted(polls.items()):
        if poll == DEAD or poll == UNRESPONSIVE:
            buckets[str(poll)].append(wid)
            continue
        assert isinstance(poll, WorkerPoll)
        if poll.error:
            errors[wid] = poll.error
        if poll.preempted:
            buckets["preempted"].append(wid)
        if poll.state == "failed":
            buckets["fatal" if poll.fatal else "failed"].append(wid)
        elif poll.state == "parked":
            buckets["parked"].append(wid)
            if poll.park_reason == "pause":
                buckets["paused"].append(wid)
        elif poll.state == "finished":
            buckets["finished"].append(wid)
        elif poll.state == "running" and poll.progress_age_s > failure.hang_timeout_s:
            buckets["hung"].append(wid)
        else:
            buckets["running"].append(wid)
    return Health(**{k: tuple(v) for k, v in buckets.items()}, errors=errors)


def stragglers(polls: dict[int, WorkerPoll | str], blocked_for_s: float) -> tuple[int, ...]:
    """Ranks to blame when peers already left a broken group: still 'running' but not waiting in a
    collective while others parked, or stuck in a collective past `blocked_for_s`."""
    out = []
    for wid, poll in polls.items():
        if isinstance(poll, WorkerPoll) and poll.state == "running":
            waiting = poll.waiting_in_collective_s
            if waiting is None or waiting > blocked_for_s:
                out.append(wid)
    return tuple(sorted(out))
