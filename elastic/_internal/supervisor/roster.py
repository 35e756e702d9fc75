"""Who is in the group: the members in rank order, the generation they form, and what is said of
each worker.

The roster keeps membership's bookkeeping for the controller: which worker holds which rank, who
has joined the run (its `worker_started` event), a worker's description in events, dropping a lost
worker, forwarding the workers' own events with who sent them, and the preemption notice to the
members of a node that is being drained. It decides nothing (the policy does) and owns no actor
(the worker group does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from elastic._internal.events import Event
from elastic._internal.protocol import WorkerPoll

if TYPE_CHECKING:
    from elastic._internal.supervisor.controller import Controller


class Roster:
    def __init__(self, ctl: Controller):
        self._ctl = ctl
        self.members: list[int] = []  # worker ids in rank order
        self.rank_of: dict[int, int] = {}  # worker id -> rank in the current generation
        self.generation = -1
        self._joined: set[int] = set()
        self._notified: set[int] = set()
        self._next_drain_check = 0.0
        self.draining: set[str] = set()
        """The nodes Ray was draining at the last look (no standby is started there)."""

    def assign(self, members: list[int]) -> None:
        """These workers are the group now (rank = position in keep_places' order)."""
        infos = self._ctl.group.infos
        self.members = keep_places(self.members, members,
                                   node_of=lambda w: (i.node_id if (i := infos.get(w)) is not None else None))
        self.rank_of = {w: r for r, w in enumerate(self.members)}

    def join(self, wid: int, **fields: Any) -> None:
        """A worker's first group: the run tells it once (worker_started)."""
        if wid not in self._joined:
            self._joined.add(wid)
            self.emit(Event.WORKER_STARTED, wid, **fields)

    def nodes(self) -> set[str]:
        """The nodes that host the members' ranks."""
        infos = self._ctl.group.infos
        return {i.node_id for w in self.members if (i := infos.get(w)) is not None}

    def drop(self, wid: int, reason: str) -> None:
        """A worker is lost: its node's slot is free for a standby, the run says why, it is killed."""
        ctl = self._ctl
        info = ctl.group.infos.get(wid)
        if info is not None:
            ctl.supply.lost_nodes.append(info.node_id)
        ctl.supply.crowded.discard(wid)
        last = ctl.ledger.last_polls.get(wid)
        error = last.error if isinstance(last, WorkerPoll) and last.error else None
        self.emit(Event.WORKER_FAILED, wid, reason=reason, error=error)
        ctl.group.kill(wid)

    def watch_drains(self) -> None:
        """A node being drained (spot preemption via Ray, autoscaler scale-down) gets the same
        treatment as SIGTERM to its workers: commit at the next step boundary, then leave."""
        ctl = self._ctl
        if ctl.clock() < self._next_drain_check:
            return
        self._next_drain_check = ctl.clock() + ctl.policy.drain_check_interval_s
        draining = self.draining = ctl.group.draining_nodes()
        if not draining:
            return
        leaving = [w for w in self.members if w not in self._notified
                   and (info := ctl.group.infos.get(w)) is not None and info.node_id in draining]
        if leaving:
            self._notified.update(leaving)
            for wid in leaving:
                self.emit(Event.NODE_DRAINING, wid)
            ctl.group.request_preempt(leaving)

    def forward_events(self, answers: dict[int, WorkerPoll]) -> None:
        """Workers' events go to the log with who sent them."""
        ctl = self._ctl
        for wid, poll in answers.items():
            info = ctl.group.infos.get(wid)
            for ev in poll.events:
                ctl.events.record({**ev, "worker": wid, "rank": self.rank_of.get(wid),
                                   "pid": info.pid if info else None})

    def emit(self, event: Event, wid: int, **fields: Any) -> None:
        """An event about one worker, with its description."""
        self._ctl.events.emit(event, **self.describe(wid), **fields)

    def describe(self, wid: int) -> dict[str, Any]:
        info = self._ctl.group.infos.get(wid)
        return {"worker": wid, "rank": self.rank_of.get(wid), "pid": info.pid if info else None,
                "node_id": info.node_id if info else None}


def keep_places(previous: list[int], members: list[int],
                node_of: Callable[[int], str | None] = lambda _: None) -> list[int]:
    """The rank order of a new group: at the same world size, a member that was in the previous group
    keeps its rank and newcomers take the ranks the lost ones left, in order; the same members keep
    the order given; a group of another size is numbered afresh, each node's ranks contiguous (nodes
    in the order of their first member, as torchrun numbers ranks node by node). A rank's data and,
    under HSDP, which ranks share a node then stay as they were, and do not depend on where Ray
    placed each worker: the gradient sums add the same numbers in the same order, and a run with a
    replaced rank stays bitwise equal to one without failures (and a sharded model moves only the
    newcomers' rows)."""
    if len(previous) != len(members):
        order = {n: i for i, n in enumerate(dict.fromkeys(node_of(w) for w in members))}
        return sorted(members, key=lambda w: order[node_of(w)])  # stable: the order given within a node
    if set(previous) == set(members):
        return list(members)
    mine = set(members)
    newcomers = iter([w for w in members if w not in set(previous)])
    return [w if w in mine else next(newcomers) for w in previous]
