"""Restoring the newest committed state at the start of a generation (ctx.restore).

Sources, freshest first: this rank's own snapshot, a surviving peer's snapshot (recovery/peer_sync.py;
for a sharded model the rows the group holds, moved onto its layout by recovery/sharded_state.py),
the newest durable checkpoint that verifies. Every rank takes the same branch: each decision comes
from values the group agreed on.
"""

from __future__ import annotations

from elastic._internal import tree
from elastic.errors import ConfigError, WorkerGroupError
from elastic._internal.events import Event
from elastic._internal.protocol import Restored
from elastic.train_state import TrainState
from elastic._internal.worker import fsdp, kept_model, rehearsal
from elastic._internal.worker.groups import ProcessGroups
from elastic._internal.worker.model_prep import ModelPrep
from elastic._internal.worker.recovery import peer_sync, reshard, sharded_state
from elastic._internal.worker.seeding import reseed
from elastic._internal.worker.services import Services
from elastic._internal.worker.snapshotter import Snapshotter


class Restorer:
    """One generation's restore."""

    def __init__(self, groups: ProcessGroups, services: Services, model: ModelPrep, snapshots: Snapshotter):
        self.groups = groups
        self.s = services
        self.model = model
        self.snapshots = snapshots
        self.host_bytes = 0
        """Host memory of the snapshot and buddy buffers when the last restore began (tests read it)."""
        self.mapped_bytes = 0
        """Of host_bytes: a ward's rows mapped from its shared memory (recovery/host_slots.py)."""
        self.restored_state: TrainState | None = None
        """The state given to restore() in this generation (where data_loader() starts)."""
        self.init_skipped = False
        """The model was built without initialising its weights (skip_init_if_restoring)."""
        self._will_load: bool | None = None

    def will_load(self) -> bool:
        """Whether restore() will load a state (from memory or storage) rather than start fresh, as
        every rank agrees: the same test restore() makes, on what each rank holds now (a collective
        on the control plane: every rank calls it at the same point; the first answer is kept).
        Holdings only grow until restore() runs, so a True here is a load there."""
        if self._will_load is None:
            self._will_load = self._agree_to_load()
        return self._will_load

    def _agree_to_load(self) -> bool:
        s = self.s
        s.snapshot.wait()
        s.buddy.wait()
        mine = [sharded_state.holding(s, self.groups.rank).to_json(), s.snapshot.held_step(),
                bool(s.snapshot.shards), s.latest_durable_step()]
        docs = self.groups.ctrl.all_gather_json(mine)
        if max(d[3] for d in docs) >= 0:
            return True
        if any(d[2] for d in docs):  # sharded: complete only when every old rank's rows are held
            return reshard.choose([reshard.Holding.from_json(d[0]) for d in docs]) is not None
        return max(d[1] for d in docs) >= 0

    def restore(self, state: TrainState) -> bool:
        """Load the newest committed state into `state`; False on a fresh run (nothing to load)."""
        s, ctrl = self.s, self.groups.ctrl
        self.restored_state = state
        s.snapshot.wait()
        if s.snapshot.shards and not self.model.sharded:
            raise ConfigError("this run's state is sharded (FSDP2): call ctx.prepare_model(model, "
                              "strategy='fsdp' or 'hsdp') and build the optimizer before ctx.restore(state)")
        if self.model.sharded:
            return self._restore_sharded(state)
        agreed = peer_sync.agree(s.snapshot.held_step(), s.latest_durable_step(), ctrl,
                                 last_committed=s.board.get().step)
        source = "fresh"
        if agreed.peers_are_freshest:
            sd, source = peer_sync.newest_state(s.snapshot, agreed, ctrl, like=state.state_dict())
            # Clones: an optimizer keeps the tensors it is given, and training must never write
            # into the snapshot it may have to restore from again.
            state.load_state_dict(tree.map_tensors(sd, lambda _, t: t.clone()))
            # Loading may have written into the tensors a live snapshot references (the same state
            # object again: their version counters moved). This rank must still hold the restored
            # step through the first step after it, or a failure there falls back to storage.
            if s.snapshot.held_step() != state.step:
                self.snapshots.capture(state, wait=True, live=self.snapshots.live(state))
        elif agreed.durable >= 0:
            source = self._restore_checkpoint(state, agreed.durable)
        return self._restored(state, source, agreed.last_committed)

    def _restore_sharded(self, state: TrainState) -> bool:
        """A sharded state: the newest step every rank's rows are held at (own snapshots and buddy
        copies), moved onto this group's layout; storage only when a rank and its buddy were lost."""
        fsdp.check_optimizer(state.model, state.optimizer)
        self.model.optimizer = state.optimizer
        s = self.s
        s.buddy.wait()
        s.buddy.release_spare(s.snapshot.borrowed)  # an exchange cut short will never complete: its memory goes first
        found, durable, last_committed = sharded_state.agree(self.groups, s, s.latest_durable_step(),
                                                             s.board.get().step)
        if found is not None and found.step >= durable:
            # A failure during an exchange finds both steps held (own rows and buddy copy, the newer
            # and the older): only the agreed one is read, the other goes before any row moves.
            s.snapshot.keep(found.step)
            s.buddy.keep(found.step)
        # The slot kept for the snapshot's rows stays only while the snapshot to restore borrows it.
        s.buddy.slots.close(keep=s.snapshot.borrowed if found is not None and found.step >= durable else None)
        self.mapped_bytes = s.buddy.mapped_bytes
        # The borrowed rows are counted once: in the slot kept for them, or else as the snapshot's.
        borrowed = 0 if s.buddy.slots.holds(s.snapshot.borrowed) else s.snapshot.borrowed_nbytes
        self.host_bytes = s.snapshot.nbytes + borrowed + s.buddy.nbytes + self.mapped_bytes
        source = "fresh"
        if (found is not None and found.step >= durable) or durable >= 0:
            # What state_dict() would make by a real step: the kept model's optimizer has it already.
            if not kept_model.adopt_optimizer_state(state.optimizer, self.model.previous_optimizer):
                fsdp.init_optimizer_state(state.optimizer)
        self.model.previous_optimizer = None
        s.layout = rehearsal.describe(state.optimizer)  # what a standby rehearses (asked for by the supervisor)
        if found is not None and found.step >= durable:
            source = sharded_state.restore(self.groups, s, state, found, self.model.layout, self.model.replicated)
        elif durable >= 0:
            source = self._restore_checkpoint(state, durable)
        if source in ("memory", "buddy", "replica") and not self._snapshot_in_place(found):
            self.snapshots.capture(state, wait=True)
        if source != "fresh":
            # Copies of the old layout go, but a survivor's copy still in place stays (its ward's
            # rows of this step, at the same world size); the others are exchanged before training
            # resumes. In the background, a failure in the first step (a burst: the survivor that
            # sent the newcomer its rows) found the restored step held once and went back to the
            # checkpoint. Waiting costs little: a survivor in its place points its newcomer at the
            # slot it kept (host_slots.SlotWriter.close), and the first commit waited anyway (the
            # transfer phase of a 2-rank recovery: 0.81 s in the background, 0.88 s settled).
            kept = frozenset()
            if found is not None and found.step >= durable and not self.model.replicated:
                kept = sharded_state.copies_in_place(found, self.model.layout,
                                                     reshard.buddies(list(self.snapshots.nodes())))
            if self.groups.rank not in kept:
                s.buddy.clear()
            self.snapshots.exchange(in_place=kept, wait=True)
        return self._restored(state, source, last_committed)

    def _snapshot_in_place(self, found: reshard.Source | None) -> bool:
        """This rank's snapshot already is the restored state (a survivor in its old place, same
        layout): its rows, replicated tensors and values of found.step. No copy needed."""
        snap, layout, rank = self.s.snapshot, self.model.layout, self.groups.rank
        return (found is not None and not self.model.replicated and snap.step == found.step
                and snap.origin == (layout.coords[rank], layout.shards) and found.old_world == layout.shards)

    def _restore_checkpoint(self, state: TrainState, step: int) -> str:
        """Load the newest checkpoint that verifies (at or below `step`) and snapshot it."""
        template = state.state_dict()
        info = self.s.checkpointer.load(template, step=step, fallback=True)
        if info is None:
            raise WorkerGroupError(f"checkpoint at step {step} vanished while loading")
        state._load_written_in_place(template)  # the checkpointer loads in place
        self.snapshots.capture(state, wait=True, live=self.snapshots.live(state))
        return f"checkpoint:{info.step}"

    def _restored(self, state: TrainState, source: str, last_committed: int) -> bool:
        s = self.s
        if source == "fresh" and (self.init_skipped or self.model.reused):  # will_load() said otherwise
            self.model.forget_kept()  # never train on garbage, nor on the weights of steps nobody committed
            raise WorkerGroupError("the model was built without initialising its weights, or kept from the last "
                                   "generation (a restore was agreed), but there was no state to restore: the next "
                                   "generation builds it afresh")
        restored = Restored(generation=self.groups.generation, step=state.step,
                            lost_steps=max(0, last_committed - state.step))
        s.board.progress(state.step, restored=restored)
        # model_kept: a survivor trained on the model it had sharded (kept_model.py); rehearsed: a
        # standby had rehearsed the job's optimizer step before it was promoted (rehearsal.py).
        s.board.emit(Event.RESTORED, step=state.step, source=source, generation=restored.generation,
                     lost_steps=restored.lost_steps, model_kept=self.model.reused, rehearsed=s.rehearsed)
        reseed(s.seed, state.step, self.groups.rank)
        return source != "fresh"
