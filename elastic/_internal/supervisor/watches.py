"""Push before poll: how the supervisor hears from its workers.

Every worker has one watch (a long poll) outstanding, which it answers when it has news and at least
every liveness_interval_s; Ray fails it at once when the worker dies. The newest answer of each is
kept here, aged to now when read. A worker with no answer yet, or whose watch is overdue, is asked
directly. Events and metrics records pass through an Inbox, so that each reaches the controller
exactly once although answers may be lost or come twice.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from elastic._internal.protocol import PollFailure, WorkerPoll


@dataclasses.dataclass(frozen=True)
class _Watch:
    ref: Any
    issued: float


def _aged(poll: WorkerPoll | PollFailure, elapsed: float) -> WorkerPoll | PollFailure:
    """An answer `elapsed` seconds old, with its ages as they are now (what hang detection reads)."""
    if not isinstance(poll, WorkerPoll) or elapsed < 0.05:
        return poll
    waiting = poll.waiting_in_collective_s
    return dataclasses.replace(poll, progress_age_s=poll.progress_age_s + elapsed,
                               waiting_in_collective_s=None if waiting is None else waiting + elapsed)


class Inbox:
    """Events and metrics records on their way from the workers to the controller, each delivered
    exactly once although answers may be lost or come twice (elastic._internal.worker.status numbers them)."""

    def __init__(self) -> None:
        self._acks: dict[int, tuple[int, int]] = {}
        """wid -> the newest (event, record) sequence numbers taken in: sent with each question, so
        that the worker drops only what arrived."""
        self._held: dict[int, tuple[list, list]] = {}
        """wid -> events and records taken in and not handed to the controller yet."""

    def ack(self, wid: int) -> tuple[int, int]:
        return self._acks.get(wid, (0, 0))

    def take(self, wid: int, poll: WorkerPoll) -> WorkerPoll:
        """Keep what `poll` carries that is new; returns it without events and records."""
        ev_have, rec_have = self.ack(wid)
        events = poll.events[max(0, ev_have - poll.event_seq + 1):]
        records = poll.records[max(0, rec_have - poll.record_seq + 1):]
        self._acks[wid] = (max(ev_have, poll.event_seq + len(poll.events) - 1),
                           max(rec_have, poll.record_seq + len(poll.records) - 1))
        if events or records:
            held = self._held.setdefault(wid, ([], []))
            held[0].extend(events)
            held[1].extend(records)
        return dataclasses.replace(poll, events=[], records=[]) if (poll.events or poll.records) else poll

    def deliver(self, wid: int, answer: WorkerPoll | PollFailure) -> WorkerPoll | PollFailure:
        """`answer` with what is held for this worker (handed over once; kept for a later answer
        when this one is a failure)."""
        if not isinstance(answer, WorkerPoll) or wid not in self._held:
            return answer
        events, records = self._held.pop(wid)
        return dataclasses.replace(answer, events=events, records=records)

    def drop(self, wid: int) -> None:
        self._acks.pop(wid, None)
        self._held.pop(wid, None)


class Watches:
    """The watches outstanding on a group's workers and the newest answer of each."""

    def __init__(self, actors: dict[int, Any], liveness_s: float) -> None:
        """`actors`: the group's worker id -> actor, shared (not copied): a worker it no longer
        holds is dead to every question."""
        self._actors = actors
        self._liveness_s = liveness_s
        self._watches: dict[int, _Watch] = {}
        self._by_ref: dict[ray.ObjectRef, int] = {}
        self._latest: dict[int, tuple[WorkerPoll | PollFailure, float]] = {}
        """wid -> (the newest answer, without its events and records; when it came)."""
        self._versions: dict[int, int] = {}
        self._inbox = Inbox()

    def answers(self, wids: list[int], timeout_s: float) -> dict[int, WorkerPoll | PollFailure]:
        """What each worker last said (see WorkerGroup.poll). A worker with no answer yet (just
        started, or assigned a new generation) is asked directly within timeout_s; one whose watch
        is older than liveness_interval_s + timeout_s / 2 is asked within the other half.
        Unanswered, it is frozen (UNRESPONSIVE)."""
        now = time.monotonic()
        self.harvest(now)
        out: dict[int, WorkerPoll | PollFailure] = {}
        ask, overdue = [], []  # no answer yet; a watch overdue: each asked directly
        for wid in wids:
            if wid not in self._actors:
                out[wid] = PollFailure.DEAD
                continue
            if wid not in self._watches and not isinstance(self._latest.get(wid, (None,))[0], PollFailure):
                self.watch(wid)
            latest = self._latest.get(wid)
            if latest is None:
                ask.append(wid)
                continue
            w = self._watches.get(wid)
            if w is not None and now - w.issued > self._liveness_s + timeout_s / 2:
                # Overdue. A loaded machine can delay one answer (a watch waits behind the worker's
                # other calls): a direct question decides, within the other half of timeout_s, so
                # a frozen worker is still found within liveness_interval_s + timeout_s.
                overdue.append(wid)
                continue
            answer, at = latest
            out[wid] = self._inbox.deliver(wid, _aged(answer, now - at))
        if ask or overdue:
            out.update(self._ask(ask, timeout_s, overdue, timeout_s / 2))
        return out

    def watching(self, wid: int) -> bool:
        return wid in self._watches

    def is_dead(self, wid: int) -> bool:
        """Whether the newest word on `wid` is that it died (its watch or a question failed so)."""
        latest = self._latest.get(wid)
        return latest is not None and latest[0] is PollFailure.DEAD

    def watch(self, wid: int) -> None:
        """Put a watch on `wid`, asking for news beyond its newest answer."""
        latest = self._latest.get(wid)
        last = latest[0] if latest is not None else None
        version = self._versions.get(wid, -1)
        step = last.step if isinstance(last, WorkerPoll) else -1
        ref = self._actors[wid].watch.remote(version, step, self._liveness_s, self._inbox.ack(wid))
        self._watches[wid] = _Watch(ref, time.monotonic())
        self._by_ref[ref] = wid

    def harvest(self, now: float) -> None:
        """Take in every watch that answered (or failed) since the last look; re-arm them."""
        if not self._watches:
            return
        refs = [w.ref for w in self._watches.values()]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            wid = self._by_ref.pop(ref)
            self._watches.pop(wid, None)
            try:
                version, poll = ray.get(ref, timeout=0)
            except RayActorError:
                self._latest[wid] = (PollFailure.DEAD, now)
                continue
            except Exception:  # noqa: BLE001 - a watch that failed otherwise: ask again next time
                continue
            self._versions[wid] = version
            self._keep(wid, poll, now)
            if wid in self._actors:
                self.watch(wid)

    def _keep(self, wid: int, poll: WorkerPoll, now: float) -> None:
        """Store a worker's newest answer (its events and records wait in the inbox)."""
        self._latest[wid] = (self._inbox.take(wid, poll), now)

    def _ask(self, wids: list[int], timeout_s: float, overdue: tuple[int, ...] | list[int] = (),
             overdue_timeout_s: float = 0.0) -> dict[int, WorkerPoll | PollFailure]:
        """Ask `wids` (within timeout_s) and `overdue` (within overdue_timeout_s) directly."""
        refs = {wid: self._actors[wid].poll.remote(self._inbox.ack(wid)) for wid in [*wids, *overdue]}
        t0 = time.monotonic()
        if overdue:
            ray.wait([refs[w] for w in overdue], num_returns=len(overdue), timeout=overdue_timeout_s)
        if wids:
            ray.wait([refs[w] for w in wids], num_returns=len(wids), timeout=max(0.0, timeout_s - (time.monotonic() - t0)))
        out: dict[int, WorkerPoll | PollFailure] = {}
        now = time.monotonic()
        for wid, ref in refs.items():
            try:
                self._keep(wid, ray.get(ref, timeout=0), now)
                out[wid] = self._inbox.deliver(wid, self._latest[wid][0])
                w = self._watches.get(wid)
                if w is not None:  # it answered: its watch, if overdue, counts from now
                    self._watches[wid] = _Watch(w.ref, now)
            except GetTimeoutError:
                out[wid] = PollFailure.UNRESPONSIVE
            except RayActorError:
                out[wid] = PollFailure.DEAD
                self._latest[wid] = (PollFailure.DEAD, now)
        return out

    def forget(self, wid: int) -> None:
        """Drop what a worker said before (it was given a new generation). Its events and records
        are kept: those taken in wait here, the rest wait unacknowledged on the worker (a watch
        still in flight is never looked at, and the next answer carries what it took)."""
        self._latest.pop(wid, None)
        self._versions.pop(wid, None)
        w = self._watches.pop(wid, None)
        if w is not None:
            self._by_ref.pop(w.ref, None)

    def drop(self, wid: int) -> None:
        """Forget a worker altogether (it is killed), with its events and records not delivered."""
        self.forget(wid)
        self._inbox.drop(wid)
