"""Taking this rank's snapshot of a committed step (snapshot.py holds it), and for a sharded model
sending its rows to the rank's buddy (recovery/buddy.py). Under HSDP on several nodes a rank's rows
are held by its replicas too: no buddy copy; each rank keeps its snapshot of the step before the
newest instead (its replicas may be a step behind when one of them is lost).

A sharded model's exchange runs inside ctx.commit() by default (FailureConfig.buddy_overlap off,
state on the CPU): the rank sends its live rows, which nothing changes while the commit runs, and
copies them into its snapshot only once every rank holds its copy of the step. The snapshot of the
step before is then what a failure during the exchange rolls back to, and its buffers take the new
copy: host copies are 3x the shard (snapshot, buddy copy, the copy being received). A buddy on the
same host maps the rows from the rank's own slot instead (host_slots.py), and the snapshot references
that slot rather than copying the rows a second time: one memcpy per step, 2x (the rank's two slots).
Overlapped, the new snapshot is taken first and sent in the background while the next step runs: 4x.

A snapshot is copied, or references the live tensors (FailureConfig.live_snapshots) when the state
is replicated, on the CPU, and changed by an optimizer. Live snapshots assume that no collective
runs between optimizer.step() and ctx.commit(); an optimizer hook notes the training group's
collective count when the step begins, and the commit checks it did not move.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from elastic.errors import WorkerGroupError
from elastic.train_state import TrainState
from elastic._internal.worker.capture import CapturePlan, Items
from elastic._internal.worker.groups import ProcessGroups
from elastic._internal.worker.model_prep import ModelPrep
from elastic._internal.worker.recovery import host_slots, reshard
from elastic._internal.worker.services import Services

log = logging.getLogger(__name__)

INLINE_GRACE_S = 0.5
"""How long a commit's inline buddy exchange may go on once the supervisor asked this rank to pause
(a peer was lost, or the group grows) before it is left behind: a send to a rank that died
mid-transfer never fails by itself. Above a healthy exchange's time (0.1 s for 146 MB here), so a
growing group does not give up a step for it."""


class Snapshotter:
    """One generation's captures: the capture plan of the state it commits, the optimizer hook, the
    live-snapshot checks and the buddy exchange."""

    def __init__(self, groups: ProcessGroups, services: Services, model: ModelPrep):
        self.groups = groups
        self.s = services
        self.model = model
        self._nodes: tuple[str, ...] | None = None
        self._mapped: frozenset[tuple[int, int]] | None = None
        self._plan: CapturePlan | None = None
        self._hooks: list[Any] = []
        self._seq_at_step: int | None = None
        """The training group's collective count when optimizer.step() began (live snapshots)."""

    def take(self, state: TrainState, *, live: bool = False) -> None:
        """A commit's snapshot of `state`, and for a sharded model its buddy copy: inline (the
        exchange first, from the live rows, then the copy) or overlapped (see the module's doc)."""
        if self.model.sharded and not self.model.replicated:
            self._refuse_unprotected()
        if self._inline(state):
            self.take_inline(self._plan_for(state).items(), state.step)
            return
        self.capture(state, live=live)
        if self.model.sharded:
            self.exchange()

    def capture(self, state: TrainState, *, wait: bool = False, live: bool = False) -> None:
        """Snapshot `state` (stable tensors copied in the background unless `wait`; referenced,
        not copied, when `live`)."""
        self._capture(self._plan_for(state).items(), state.step, live=live)
        if wait:
            self.s.snapshot.wait()

    def _capture(self, items: Items, step: int, *, live: bool = False, keep_previous: bool | None = None,
                 borrowed: dict | None = None) -> None:
        """keep_previous: the snapshot before stays until release_previous() (by default for a
        sharded model on several ranks: until the new one's buddy copy arrived)."""
        sharded, rank, world = self.model.sharded, self.groups.rank, self.groups.world_size
        if sharded:
            self.s.buddy.wait()  # pace: the previous snapshot's buddy copy has arrived (or failed)
        if sharded and self.model.replicated:
            # HSDP keeps one older step: the newest becomes it, the older one's buffers take the copy
            self.s.snapshot.release_previous(keep_buffers=True)
        # A sharded snapshot's rows are named by their place in the layout: its rank for FSDP, its
        # column for HSDP (the same rows as every replica's: recovery finds them at any of them).
        layout = self.model.layout if sharded else None
        origin = (layout.coords[rank], layout.shards) if layout is not None else (rank, world)
        if keep_previous is None:
            keep_previous = sharded and world > 1
        self.s.snapshot.capture_items(items.stable, items.volatile, items.values, step, items.shards,
                                      origin=origin, keep_previous=keep_previous, live=live, borrowed=borrowed)

    def live(self, state: TrainState) -> bool:
        """Whether this commit's snapshot may reference the live tensors: replicated state on the
        CPU, changed by an optimizer (whose step the version counters see), live snapshots on, and
        no change behind the counters seen so far (the snapshot's checksum: copies from then on)."""
        if self.s.snapshot.violation is not None:
            self.s.live_snapshots = False
        return (self.s.live_snapshots and not self.model.sharded and state.optimizer is not None
                and self._plan_for(state).on_cpu)

    def check_window(self) -> None:
        """Live snapshots assume no collective runs between optimizer.step() and ctx.commit(): a
        failure seen there would find the live state changed and this rank's snapshot gone. A loop
        that runs one (a loss all_reduce for logging, ZeRO) gets copies from now on."""
        at, self._seq_at_step = self._seq_at_step, None
        if at is None or not self.s.live_snapshots:
            return
        now = self._train_seq()
        if now is not None and now != at:
            self.s.live_snapshots = False
            log.warning("rank %d: collectives ran between optimizer.step() and ctx.commit(); snapshots are "
                        "copied from now on (a failure there must still find this step's state)", self.groups.rank)

    def exchange(self, *, wait: bool = False, in_place: frozenset[int] = frozenset()) -> None:
        """Send the newest snapshot's rows to our buddy and take our ward's, in the background;
        `wait`: return once it settled (or, the group breaking, was left behind after the grace).
        `in_place`: the ranks that already hold their ward's rows of this step (nothing goes to them)."""
        rank, world = self.groups.rank, self.groups.world_size
        if self.model is not None and self.model.replicated:
            return  # HSDP: the replicas hold our rows; the older snapshot goes at the next capture
        if world < 2 or self.groups.xfer is None:
            self.s.snapshot.release_previous()
            return
        snap, buddy = self.s.snapshot, self.s.buddy
        to, ward = self._ring()
        local = self._local(to, ward)
        which = snap.pin()

        def done() -> None:
            snap.unpin(which)
            if buddy.error is None:
                snap.release_previous(keep_buffers=True)  # the next capture's buffers

        buddy.exchange(self.groups.xfer, me=rank, world=world, to=to, frm=ward, step=snap.step,
                       mine=[(p, t) for p, t in snap.tensors if p in snap.shards], shards=snap.shards,
                       ready=snap.waiter(), done=done, send=to not in in_place, recv=rank not in in_place,
                       local_to=local[0], local_frm=local[1])
        if wait:
            with self.s.clock.timing():  # waiting on peers: this rank is not the one to blame
                buddy.finish(self.s.pause, INLINE_GRACE_S)

    def _inline(self, state: TrainState) -> bool:
        """Whether this commit's exchange runs inline: a sharded model without replicas, on several
        ranks, its state on the CPU (gloo sends host memory), buddy_overlap off."""
        return (self.model.sharded and not self.model.replicated and self.groups.world_size > 1
                and self.groups.xfer is not None and not self.s.run.failure.buddy_overlap
                and self._plan_for(state).on_cpu)

    def take_inline(self, items: Items, step: int) -> None:
        """Send this rank's live rows of `step` to its buddy and take its ward's, then snapshot the
        step into the buffers of the one before (nothing else holds it any more). The training
        thread waits, so the live rows are the step's throughout. If the exchange fails, the step
        is snapshotted beside the one before (what an overlapped exchange would hold): a restore
        finds one step held everywhere, the newer one if every copy of it arrived."""
        buddy, (to, ward) = self.s.buddy, self._ring()
        mine = [(p, t.contiguous()) for p, t in [*items.volatile, *items.stable] if p in items.shards]
        local_to, local_frm = self._local(to, ward)
        buddy.exchange(self.groups.xfer, me=self.groups.rank, world=self.groups.world_size, to=to, frm=ward,
                       step=step, mine=mine, shards=items.shards, ready=lambda: None, done=lambda: None,
                       local_to=local_to, local_frm=local_frm)
        with self.s.clock.timing():  # waiting on peers: this rank is not the one to blame
            settled = buddy.finish(self.s.pause, INLINE_GRACE_S)
        borrowed = None
        if settled:  # the step before is not needed any more (nor one a failed exchange left)
            self.s.snapshot.release_previous(keep_buffers=True)
            # Our rows of the step are in our slot already (a buddy on this host maps it), and nothing
            # writes there before step + 2: the snapshot references them, one copy less per step.
            if local_to:
                borrowed = buddy.slots.rows(step)
        self._capture(items, step, keep_previous=not settled, borrowed=borrowed)

    def _refuse_unprotected(self) -> None:
        """The newest step's buddy exchange failed (the step before is still held for it): a peer is
        gone. Another commit on top would drop the step a restore needs (its rows are at no buddy)
        and lose two steps: the group is broken, leave it now."""
        self.s.buddy.wait()
        if self.s.buddy.error is not None and self.s.snapshot.previous is not None:
            self.s.clock.broken = True
            raise WorkerGroupError(f"the buddy exchange of step {self.s.snapshot.step} failed "
                                   f"({self.s.buddy.error}): the group is broken")

    def _ring(self) -> tuple[int, int]:
        """(the rank this one sends its rows to, its ward: the rank whose rows it holds)."""
        to = reshard.buddies(list(self.nodes()))
        return to[self.groups.rank], to.index(self.groups.rank)

    def _local(self, to: int, ward: int) -> tuple[bool, bool]:
        """(whether rank `to` maps this rank's rows, whether this rank maps its ward's) instead of
        receiving them over the transfer plane (host_slots.py; FailureConfig.buddy_shm)."""
        if self._mapped is None:
            self._mapped = self._gather_mapped() if self.s.run.failure.buddy_shm else frozenset()
        me = self.groups.rank
        return (me, to) in self._mapped, (ward, me) in self._mapped

    def _gather_mapped(self) -> frozenset[tuple[int, int]]:
        """The (writer, reader) pairs of ranks on one node where the reader may map the writer's
        memory: two gathers on the control plane, once per generation (every rank at its first
        exchange)."""
        nodes, me, ctrl = self.nodes(), self.groups.rank, self.groups.ctrl
        pids = ctrl.all_gather_json(os.getpid())
        can = [w for w in range(len(nodes)) if w != me and nodes[w] == nodes[me] and host_slots.can_map(pids[w])]
        return frozenset((w, r) for r, ws in enumerate(ctrl.all_gather_json(can)) for w in ws)

    def nodes(self) -> tuple[str, ...]:
        """Every rank's node, in rank order (ModelPrep gathers them once per generation)."""
        if self._nodes is None:
            self._nodes = self.model.nodes()
        return self._nodes

    def release(self) -> None:
        """Remove the optimizer hook and forget the plan (the generation ends)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._plan = None

    def _train_seq(self) -> int | None:
        """How many collectives the training group has run (c10d counts them), None if unknown."""
        try:
            return int(self.groups.train._get_sequence_number_for_group())
        except Exception:  # noqa: BLE001 - a group without the counter: no check
            return None

    def _plan_for(self, state: TrainState) -> CapturePlan:
        """The capture plan of `state` (built at its first commit in this generation), and the hook
        that notes the training group's collective count when its optimizer steps (live snapshots).
        No hook waits for a copy: a copied snapshot is complete when the commit returns."""
        if self._plan is None or self._plan.state is not state:
            self.release()
            self._plan = CapturePlan(state)
            if state.optimizer is not None:

                def before_step(*_: Any) -> None:
                    if self.s.live_snapshots:
                        self._seq_at_step = self._train_seq()

                self._hooks.append(state.optimizer.register_step_pre_hook(before_step))
        return self._plan
