"""Forming a group: getting every member out of the old one, gathering the next one's members, and
building its generation.

`quiesce` parks, finishes or drops the old group's members (the policy says who must go and when);
`rebuild` gathers the survivors, ready newcomers and promoted standbys until the policy says build
(or fail); `build` hands each member its Assignment (rank, local rank, store, GPUs) and starts the
generation, giving it up at once when a member is lost before it formed. The policy decides; the
roster, the ledger and the supply keep the books.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from elastic._internal.events import Event
from elastic._internal.protocol import Assignment, AssignmentMode, PollFailure, WorkerPoll, WorkerState
from elastic._internal.supervisor import policy as pol
from elastic._internal.supervisor.decisions import Build, Fail, Remove, WaitForWorkers
from elastic._internal.supervisor.states import Restarting, Running, State, Stopping

if TYPE_CHECKING:
    from elastic._internal.supervisor.controller import Controller


class Formation:
    def __init__(self, ctl: Controller):
        self._ctl = ctl

    def quiesce(self, known_lost: set[int], reason: str) -> tuple[list[int], list[int]]:
        """Get every member out of the old group: parked, finished or gone (the policy says who
        must go and when). The survivors and the lost."""
        ctl = self._ctl
        members = ctl.roster.members
        lost = [w for w in members if w in known_lost]
        alive = [w for w in members if w not in known_lost]
        mates = ctl.supply.node_mates(lost, alive)  # lost with the same node, at once
        alive = [w for w in alive if w not in mates]
        for wid in lost:
            ctl.roster.drop(wid, reason)
        for wid in mates:
            ctl.roster.drop(wid, "lost with its node")
        lost += mates
        ctl.group.request_pause(alive)
        f = ctl.run.failure
        t0 = ctl.clock()
        first_park: float | None = None
        while alive:
            polls = ctl.poll(alive, f.poll_timeout_s)
            answers = {w: p for w, p in polls.items() if isinstance(p, WorkerPoll)}
            running = [w for w, p in answers.items() if p.state == WorkerState.RUNNING]
            if first_park is None and any(p.state != WorkerState.RUNNING for p in answers.values()):
                first_park = ctl.clock()
            now = ctl.clock()
            d = ctl.policy.quiesce(ctl.run, pol.QuiesceView(
                polls=polls, since_first_park_s=None if first_park is None else now - first_park, waited_s=now - t0))
            if isinstance(d, Remove):
                gone = [w for w in d.workers if w in alive]
                mates = ctl.supply.node_mates(gone, [w for w in alive if w not in gone])
                for wid in gone + mates:
                    ctl.roster.drop(wid, d.label if wid in gone else "lost with its node")
                    lost.append(wid)
                    alive.remove(wid)
                continue
            if not running:
                break
            ctl.sleep(f.poll_interval_s)
        return alive, lost

    def rebuild(self, survivors: list[int], *, reason: str) -> State:
        """Form the next group: the survivors, then ready newcomers and standbys promoted on the
        nodes of the workers lost (as soon as they are ready, also while waiting). A survivor that
        dies while the group waits is dropped there and then (another failure): a group is never
        handed to a member that is gone."""
        ctl, supply = self._ctl, self._ctl.supply
        most = ctl.run.scaling.max_workers
        assert most is not None
        survivors = list(survivors)
        members = list(survivors)
        members += supply.replacements(missing=most - len(members), exclude=members)
        t0 = ctl.clock()
        no_room_since: float | None = None
        announced = False
        while True:
            if ctl.stop_signal is not None:
                return Stopping(signal=ctl.stop_signal, survivors=tuple(survivors))
            self._drop_gone(members, survivors)
            now = ctl.clock()
            d = ctl.policy.membership(ctl.run, pol.MembershipView(
                have=len(members), waited_s=now - t0,
                no_room_for_s=None if no_room_since is None else now - no_room_since))
            if isinstance(d, Build):
                supply.top_up(background=True)
                return self.build(members, reason=reason)
            if isinstance(d, Fail):
                return ctl.ending.fail(d, survivors=survivors)
            assert isinstance(d, WaitForWorkers)
            if d.below_min and not announced:
                announced = True
                ctl.events.emit(Event.WAITING_FOR_WORKERS, have=len(members), need=ctl.run.scaling.min_workers)
            if self._gather(members, waited_s=now - t0):
                continue
            if ctl.group.placeable() > 0:
                no_room_since = None
            elif no_room_since is None:
                no_room_since = ctl.clock()
            ctl.sleep(ctl.run.failure.poll_interval_s)

    def _gather(self, members: list[int], *, waited_s: float) -> bool:
        """While the next group waits: add the newcomers and standbys ready now to `members`, then
        ask for more (a standby that became ready since the last look is a member, not a reason to
        ask for a cold worker); whether it is full."""
        ctl, supply = self._ctl, self._ctl.supply
        most = ctl.run.scaling.max_workers
        assert most is not None

        def take() -> bool:
            ctl.group.refresh()
            members.extend(supply.replacements(missing=most - len(members), exclude=members))
            return len(members) >= most

        if take():
            return True
        supply.top_up(waited_s=waited_s)
        return take()

    def _drop_gone(self, members: list[int], survivors: list[int]) -> None:
        """Of the parked survivors, drop those whose last word says they are gone (their watches
        answer at once when they die: this costs no round trip) from `members` and `survivors`: a
        failure of its own (counted, an incident opened); standbys take their places."""
        ctl = self._ctl
        if not survivors:
            return
        polls = ctl.poll(list(survivors), ctl.run.failure.poll_timeout_s)
        gone = [w for w, p in polls.items() if isinstance(p, PollFailure)
                or (isinstance(p, WorkerPoll) and p.state == WorkerState.FAILED)]
        if not gone:
            return
        gone += ctl.supply.node_mates(gone, [w for w in members if w not in gone])
        for wid in gone:
            members.remove(wid)
            if wid in survivors:
                survivors.remove(wid)
        ctl.ledger.count_failure("worker(s) lost while the next group was formed")
        for wid in gone:
            ctl.roster.drop(wid, "lost while the next group was formed")
        most = ctl.run.scaling.max_workers
        assert most is not None
        members += ctl.supply.replacements(missing=most - len(members), exclude=members)

    def build(self, members: list[int], *, reason: str,
              mode: AssignmentMode = AssignmentMode.TRAIN) -> Running | Restarting:
        """Start the next generation with these members (rank = position); a member lost before it
        formed gives it up at once."""
        ctl, roster = self._ctl, self._ctl.roster
        t0 = ctl.clock()
        ctl.supply.lost_nodes = []
        roster.generation += 1
        g = roster.generation
        roster.assign(members)
        assignments = self._assignments(g, mode)
        timeout = ctl.run.failure.poll_timeout_s + ctl.policy.assignment_slack_s
        refused = ctl.group.start(assignments, timeout)
        ctl.events.emit(Event.GROUP_BUILT, generation=g, world_size=len(roster.members), reason=reason,
                        seconds=round(ctl.clock() - t0, 4),
                        members=[roster.describe(w) for w in roster.members])
        if refused:
            # A member that is gone (or refused) before the group formed: the generation is given up
            # at once. The others are in its rendezvous, which they leave as soon as they are asked to
            # pause (never after a timeout), and the next group is formed without it.
            ctl.events.emit(Event.GROUP_FAILED, generation=g, reason="a member was lost while the group was built",
                            errors={})
            refused += ctl.supply.node_mates(refused, [w for w in roster.members if w not in refused])
            for wid in refused:
                roster.drop(wid, "lost while its group was built")
            roster.assign([w for w in roster.members if w not in refused])
            return Restarting(reason="worker lost while the group was built", failed_workers=(), since=ctl.clock())
        ctl.ledger.show(world_size=len(roster.members), generation=g)
        ctl.ledger.built()
        return Running(generation=g)

    def _assignments(self, g: int, mode: AssignmentMode) -> dict[int, Assignment]:
        """Each member's Assignment in generation `g` (a member new to the run is announced)."""
        ctl, roster = self._ctl, self._ctl.roster
        host, port = ctl.store_addr
        node_of = {w: (info.node_id if (info := ctl.group.infos.get(w)) else "?") for w in roster.members}
        per_node: dict[str, int] = {}
        for node in node_of.values():
            per_node[node] = per_node.get(node, 0) + 1
        nodes: dict[str, int] = {}
        assignments = {}
        for rank, wid in enumerate(roster.members):
            info = ctl.group.infos.get(wid)
            node = node_of[wid]
            local_rank = nodes.get(node, 0)
            nodes[node] = local_rank + 1
            assignments[wid] = Assignment(
                generation=g, rank=rank, world_size=len(roster.members), store_host=host, store_port=port,
                backend=ctl.backend, collective_timeout_s=ctl.run.failure.collective_timeout_s,
                rendezvous_timeout_s=ctl.policy.rendezvous_timeout_s(ctl.run, len(roster.members)),
                local_rank=local_rank, mode=mode, local_world_size=per_node[node], store_prefix=ctl.store_prefix,
                gpu_ids=self.gpu_ids(wid), node_id=node)
            roster.join(wid, generation=g, background_startup=info.background_startup if info else None)
        return assignments

    def gpu_ids(self, wid: int) -> tuple[str, ...] | None:
        """A promoted standby's GPUs come from its reservation (it waits for it to be placed); None
        when it was not placed in time (Assignment.gpu_ids: the worker cannot train, it is lost)."""
        ctl = self._ctl
        if ctl.run.scaling.gpus_per_worker <= 0:
            return ()
        try:
            return ctl.group.gpu_ids(wid, ctl.run.failure.poll_timeout_s + ctl.policy.assignment_slack_s)
        except Exception:  # noqa: BLE001 - not placed in time
            return None
