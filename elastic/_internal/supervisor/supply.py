"""Where the next workers come from: requests for more, the newcomers ready to join, the standby
pool on the members' nodes, and the standbys promoted to replace lost workers.

Supply keeps as many workers asked for as the policy wants, sizes the standby pool from the
failure rate (policy.standbys_per_node), promotes standbys on the nodes of lost workers (each such
node has a worker's resources free again) and says when a look for room to grow is due. The
policy decides how many; the worker group owns the actors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from elastic._internal.supervisor.controller import Controller


class Supply:
    def __init__(self, ctl: Controller):
        self._ctl = ctl
        self.lost_nodes: list[str] = []
        """Nodes of the workers lost since the last group was built (their standbys replace them)."""
        self.dead_nodes: set[str] = set()
        """Nodes Ray reported dead or gone (a whole node lost): no standby there is promoted."""
        self.crowded: set[int] = set()
        """Standbys promoted onto another rank's node (their own was lost whole): they hand over to a
        newcomer once one is ready (ResizeReason.SPREAD)."""
        self._next_grow_check = 0.0

    def grow_due(self) -> bool:
        """Whether to look for room to grow now. The check is scheduled only while the group is
        below max_workers: after a shrink the first look for room comes at once."""
        ctl = self._ctl
        return len(ctl.roster.members) < (ctl.run.scaling.max_workers or 0) and ctl.clock() >= self._next_grow_check

    def grow_checked(self) -> None:
        """The policy has looked for room: the next look comes grow_interval_s later."""
        self._next_grow_check = self._ctl.clock() + self._ctl.run.scaling.grow_interval_s

    def newcomers(self, *, limit: int, exclude: list[int] | None = None) -> list[int]:
        """Ready workers outside the group (and outside `exclude`), up to `limit`."""
        if limit <= 0:
            return []
        taken = set(self._ctl.roster.members) | set(exclude or [])
        return [w for w in self._ctl.group.ready() if w not in taken][:limit]

    def replacements(self, *, missing: int, exclude: list[int]) -> list[int]:
        """Who fills `missing` places in the next group (besides `exclude`, the members so far), the
        lost workers' own nodes first: a ready newcomer there, then a standby promoted there, then a
        newcomer on any node. A rank replaced on its own node keeps the ranks per node as they were:
        HSDP's mesh stays two-dimensional (a spare that happened to be ready on another node made
        the nodes uneven, and the run trained on as flat FSDP2 with buddy copies from then on)."""
        if missing <= 0:
            return []
        infos = self._ctl.group.infos
        picks: list[int] = []
        for wid in self.newcomers(limit=len(infos), exclude=exclude):
            node = infos[wid].node_id if wid in infos else None
            if node in self.lost_nodes and node not in self.dead_nodes and len(picks) < missing:
                self.lost_nodes.remove(node)  # replaced there: that node's standby stays a standby
                picks.append(wid)
        picks += self.promote(missing=missing - len(picks))
        return picks + self.newcomers(limit=missing - len(picks), exclude=exclude + picks)

    def top_up(self, *, background: bool = False, waited_s: float | None = None) -> None:
        """Keep as many workers requested as the policy wants; `background` when the group trains
        meanwhile (they start at idle priority). A crowded member (promoted onto another rank's
        node) does not count: a newcomer is asked for to take its place. `waited_s`: how long the
        rebuild asking has waited (the policy is told of standbys still starting where workers
        were lost; a policy written before that is only asked the old question)."""
        ctl = self._ctl
        have = len((set(ctl.group.ready()) | set(ctl.group.pending())) - self.crowded)
        coming = self._standbys_coming() if waited_s is not None else 0
        extra = {"standbys_coming": coming, "waited_s": waited_s,
                 "startup_s": ctl.group.standby_startup_s()} if coming else {}
        n = ctl.policy.to_request(ctl.run, have, **extra)
        if n > 0:
            ctl.group.request(n, background=background)

    def _standbys_coming(self) -> int:
        """Places of lost workers that a standby still starting on their (live) node can take."""
        if not self.lost_nodes:
            return 0
        starting = self._ctl.group.standbys_starting()
        lost: dict[str, int] = {}
        for node in self.lost_nodes:
            if node not in self.dead_nodes:
                lost[node] = lost.get(node, 0) + 1
        return sum(min(n, starting.get(node, 0)) for node, n in lost.items())

    def standbys_due(self) -> bool:
        """The run's first start-up is protected from standbys' start-up (a Ray worker process and
        a torch import) until its first step (+ standby_after_s); after a rebuild, only until the
        recovery is over (the new group has taken its first step: starting the successor of a
        promoted standby during the restore slowed it by 1-2 s here), so that the next failure
        (often soon after the first, on the same spot pool) still finds a warm one."""
        ctl = self._ctl
        first = ctl.ledger.first_step_at
        return (first is not None and ctl.clock() - first >= ctl.policy.standby_after_s
                and not ctl.ledger.incidents.restoring)

    def keep_standbys(self) -> None:
        """Keep the standby pool on every node that hosts ranks, sized by the policy from the
        failure rate seen so far and the standbys' measured start-up. A node being drained gets
        none: its ranks are leaving, and a standby pinned to it could never be scheduled."""
        ctl = self._ctl
        now = ctl.clock()
        first = ctl.ledger.first_built_at
        since = now - (first if first is not None else now)
        window = min(ctl.policy.standby_rate_window_s, since)
        recent = sum(1 for t in ctl.ledger.failure_times if t >= now - window)
        nodes = ctl.roster.nodes() - ctl.roster.draining
        # A policy written before `nodes` existed is only asked the old question.
        extra = {"nodes": len(nodes)} if len(nodes) > 1 else {}
        per_node = ctl.policy.standbys_per_node(ctl.run, failures_in_window=recent, window_s=window,
                                                startup_s=ctl.group.standby_startup_s(), **extra)
        ctl.group.ensure_standbys(nodes, per_node=per_node)

    def node_mates(self, lost: list[int], others: list[int]) -> list[int]:
        """The workers of `others` that were lost with a node of a worker in `lost`: one look at
        Ray's node table for the nodes of `lost` (while their infos are still known). A whole node
        lost is every member and every standby there, lost in the same recovery rather than found
        one by one (the group forgets that node's standbys at once)."""
        ctl = self._ctl
        infos = ctl.group.infos
        nodes = {i.node_id for w in lost if (i := infos.get(w)) is not None}
        if not nodes:
            return []
        found = ctl.group.lost_nodes(nodes)
        # The latest look at these nodes decides: a node the group once called lost (a standby that
        # was slow to answer the probe) is not lost for good, and only this look's nodes take mates.
        self.dead_nodes = (self.dead_nodes - nodes) | found
        return [w for w in others if (i := infos.get(w)) is not None and i.node_id in found]

    def vacated(self, wid: int) -> None:
        """A member left on a preemption notice to its own process (SIGTERM): its node has a worker's
        resources free again, for that node's standby, as after a loss; a cold start there would
        cost seconds. Not when Ray is draining the node: its standbys go with it."""
        info = self._ctl.group.infos.get(wid)
        if info is not None and info.node_id not in self._ctl.roster.draining:
            self.lost_nodes.append(info.node_id)

    def promote(self, *, missing: int) -> list[int]:
        """Promote ready standbys on the nodes of lost workers (each such node has a worker's
        resources free again), up to `missing`; their ids. A node Ray reports dead has none to
        give: its ranks go to standbys on live nodes (DefaultPolicy.promote_across_nodes)."""
        ctl = self._ctl
        if missing <= 0 or not self.lost_nodes:
            return []
        dead = [n for n in self.lost_nodes if n in self.dead_nodes]
        # A policy written before dead_nodes existed is only asked the old question.
        extra = {"dead_nodes": frozenset(dead)} if dead else {}
        picks = list(ctl.policy.standbys_to_promote(ctl.run, missing=missing, standbys=ctl.group.standbys(),
                                                    lost_nodes=self.lost_nodes, **extra))
        for wid in picks:
            node = ctl.group.infos[wid].node_id if wid in ctl.group.infos else None
            ctl.group.promote(wid)
            if node in self.lost_nodes:
                self.lost_nodes.remove(node)  # that node's free slot is taken now
            elif dead:
                self.lost_nodes.remove(dead.pop(0))  # taken over from a live node
                self.crowded.add(wid)
        return picks
