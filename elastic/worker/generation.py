"""The runtime side of one generation on one rank: restore, commit, checkpoint, and the final save.

`Services` holds what outlives generations in a worker process (the snapshot, the checkpointer,
the status the supervisor polls, the pause and preemption flags); `Generation` holds one
generation's process groups and does, on them, what the training function's calls mean. The user
sees neither: WorkerContext (context.py) is a thin facade over a Generation. Both take their
dependencies explicitly, so several ranks can run in one test process.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from elastic import tree
from elastic.checkpoint import Checkpointer, CheckpointStore
from elastic.collectives import CollectiveClock, Pending
from elastic.config import RunConfig
from elastic.errors import CheckpointFailedError, ConfigError, WorkerGroupError
from elastic.events import Event
from elastic.lease import Lease
from elastic.train_state import TrainState
from elastic.worker import fsdp
from elastic.worker.capture import CapturePlan
from elastic.worker.ddp import ExactDDP
from elastic.worker.groups import ProcessGroups
from elastic.worker.recovery import peer_sync, reshard, sharded_state
from elastic.worker.recovery.buddy import BuddyCopies
from elastic.worker.seeding import reseed
from elastic.worker.snapshot import Snapshot
from elastic.worker.status import StatusBoard

log = logging.getLogger(__name__)


VOTE_INTERVAL_S = 0.05
"""Ranks agree on pausing (a resize, a preemption, a stop) about this often: every step when steps
are longer, every few steps when they are shorter (the agreement is a collective of its own, a
cost that short steps would notice). The cadence is agreed once per generation, after
VOTE_CALIBRATION_STEPS steps, from the slowest rank's step time."""
VOTE_CALIBRATION_STEPS = 8
VOTE_MAX_EVERY = 50
SYNC_VOTE_MIN_STEP_S = 0.5
"""Steps at least this long (the slowest rank's), and the calibration steps, vote synchronously: a
stop, a preemption or a resize asked for during a step takes effect at the boundary that ends it,
for one tiny round trip per step (under 0.1 % of such a step). Shorter steps pipeline the vote (it
overlaps the following steps, free on the hot path) and act up to one voting interval later, i.e.
within about this long."""

LEAVE_SAVE_COLLECTIVES = 4
"""A save before leaving (preemption, stop) waits at most this many collective timeouts to commit."""


class PauseRequested(WorkerGroupError):
    """Unwinds the training function at a step boundary that every rank agreed on."""


class Services:
    """Per-process pieces that outlive process-group generations."""

    def __init__(self, run: RunConfig, uri: str, *, board: StatusBoard | None = None, lease_token: int = 0):
        self.run = run
        self.uri = uri
        self.seed = run.seed
        self.snapshot = Snapshot()
        self.clock = CollectiveClock()
        ck = run.checkpoint
        # Commits are fenced by the run's lease: a run that lost its location commits nothing.
        fence = (Lease(uri), lease_token) if lease_token > 0 else None
        self.checkpointer = Checkpointer(uri, keep_last=ck.keep_last, async_save=ck.async_save,
                                         when_busy=ck.when_busy, commit_timeout_s=ck.commit_timeout_s, lease=fence)
        self.catalog = CheckpointStore(uri)
        self.board = board or StatusBoard()
        self.buddy = BuddyCopies()
        self.pause = threading.Event()
        """Leave the group at the next agreed step boundary (a resize)."""
        self.leave = threading.Event()
        """Commit a durable checkpoint at the next agreed boundary, then leave (a preemption notice,
        or the driver stopping the run)."""
        self.notice = threading.Event()
        """A preemption notice reached this worker (reported in polls: it is the one leaving)."""
        self.live_snapshots = run.failure.live_snapshots
        """Snapshots reference the live tensors (FailureConfig.live_snapshots); turned off for good
        when the training loop runs collectives between optimizer.step() and ctx.commit()."""

    def latest_durable_step(self) -> int:
        """The newest step whose checkpoint verifies (quickly: manifest and metadata): a corrupt
        newer one must not make survivors reload an older state than the one they hold."""
        info = self.catalog.latest_verified()
        return -1 if info is None else info.step

    def checkpoint_due(self, step: int) -> bool:
        n = self.run.checkpoint.every_n_steps
        return n > 0 and step % n == 0


class Generation:
    def __init__(self, groups: ProcessGroups, device: torch.device, services: Services, *,
                 local_rank: int = 0, local_world_size: int = 1, node_id: str = ""):
        self.groups = groups
        self.node_id = node_id or "?"
        self._nodes: tuple[str, ...] | None = None
        self.sharded = False
        """The model was sharded with FSDP2 (prepare_model(strategy="fsdp")): buddy copies, resharding."""
        self.restore_host_bytes = 0
        """Host memory of the snapshot and buddy buffers when the last restore began (tests read it)."""
        self.restored_state: TrainState | None = None
        """The state given to restore() in this generation (where data_loader() starts)."""
        self.device = device
        self.s = services
        self.local_rank = local_rank
        self.local_world_size = local_world_size
        self._model: ExactDDP | None = None
        self._vote: Pending | None = None
        self._plan: CapturePlan | None = None
        self._hooks: list[Any] = []
        self._vote_bufs = [torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]
        self._commits = 0
        self._seq_at_step: int | None = None
        """The training group's collective count when optimizer.step() began (live snapshots)."""
        self._vote_every = 1
        self._sync_vote = True
        """Vote synchronously (SYNC_VOTE_MIN_STEP_S); agreed at calibration, the same on every rank."""
        self._calibration_t0 = 0.0

    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    # -- restore ---------------------------------------------------------------------------
    def restore(self, state: TrainState) -> bool:
        """Load the newest committed state into `state`; False on a fresh run (nothing to load).

        Sources, freshest first: this rank's own snapshot, a surviving peer's snapshot (sent over
        the control plane), the newest durable checkpoint that verifies.
        """
        s, ctrl = self.s, self.groups.ctrl
        self.restored_state = state
        s.snapshot.wait()
        if s.snapshot.shards and not self.sharded:
            raise ConfigError("this run's state is sharded (FSDP2): call ctx.prepare_model(model, strategy='fsdp') "
                              "and build the optimizer before ctx.restore(state)")
        if self.sharded:
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
                self._capture(state, wait=True, live=self._live(state))
        elif agreed.durable >= 0:
            source = self._restore_checkpoint(state, agreed.durable)
        return self._restored(state, source, agreed.last_committed)

    def _restore_checkpoint(self, state: TrainState, step: int) -> str:
        """Load the newest checkpoint that verifies (at or below `step`) and snapshot it."""
        template = state.state_dict()
        info = self.s.checkpointer.load(template, step=step, fallback=True)
        if info is None:
            raise WorkerGroupError(f"checkpoint at step {step} vanished while loading")
        state.load_state_dict(template)
        self._capture(state, wait=True, live=self._live(state))
        return f"checkpoint:{info.step}"

    def _restored(self, state: TrainState, source: str, last_committed: int) -> bool:
        s = self.s
        s.board.progress(state.step)
        s.board.emit(Event.RESTORED, step=state.step, source=source, generation=self.groups.generation,
                     lost_steps=max(0, last_committed - state.step))
        reseed(s.seed, state.step, self.rank)
        return source != "fresh"

    def _restore_sharded(self, state: TrainState) -> bool:
        """A sharded state: the newest step every rank's rows are held at (own snapshots and buddy
        copies), moved onto this group's layout; storage only when a rank and its buddy were lost."""
        fsdp.check_optimizer(state.model, state.optimizer)
        s = self.s
        s.buddy.wait()
        s.buddy.release_spare()  # an exchange cut short will never complete: its memory goes first
        found, durable, last_committed = sharded_state.agree(self.groups, s, s.latest_durable_step(),
                                                             s.board.get().step)
        self.restore_host_bytes = s.snapshot.nbytes + s.buddy.nbytes
        source = "fresh"
        if found is not None and found.step >= durable:
            source = sharded_state.restore(self.groups, s, state, found)
        elif durable >= 0:
            source = self._restore_checkpoint(state, durable)
        if source in ("memory", "buddy"):
            self._capture(state, wait=True)
        if source != "fresh":
            # Copies of the old layout go; this group's are exchanged in the background while the
            # first step runs, as after every snapshot (the next commit waits for it): a failure in
            # that step finds no buddy copy and falls back to the checkpoint, which is correct.
            s.buddy.clear()
            self._exchange()
        return self._restored(state, source, last_committed)

    # -- model -----------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module, strategy: str = "ddp", shard_modules: Any = None,
                      **ddp_kwargs: Any) -> torch.nn.Module:
        """Move `model` to this rank's device and make it data parallel over the training group:
        "ddp": wrapped in ExactDDP (ddp.py), whose bucket layout is a pure function of the model;
        "fsdp": sharded in place with FSDP2 (fsdp.py), per block then the root."""
        if strategy == "fsdp":
            fsdp.shard(model, self.groups.train, self.device, shard_modules)
            self.sharded = True
            if self.world_size > 1:
                self.groups.open_transfer_plane()
            return model
        if strategy != "ddp":
            raise ConfigError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
        model.to(self.device)
        self._model = ExactDDP(model, process_group=self.groups.train, clock=self.s.clock, **ddp_kwargs)
        return self._model

    # -- commit ----------------------------------------------------------------------------
    def commit(self, state: TrainState, metrics: dict[str, float] | None = None, *, reduce: bool = False) -> None:
        """End a step: step += 1; remember the state; checkpoint when due; apply agreed pauses."""
        s = self.s
        state.step += 1
        self._check_window()
        live = self._live(state)
        due = s.checkpoint_due(state.step)
        # This step's state is taken before any collective of the commit, so that a failure in one
        # finds it. Live: referenced (nothing to copy); a periodic checkpoint writes in the
        # background while training goes on, so it always gets a copy.
        captured = live or due or state.step % s.run.failure.snapshot_every_n_steps == 0
        if captured:
            self._capture(state, live=live and not due)
        if metrics and reduce:
            metrics = self._mean(metrics)
        pause, preempt = self._next_vote(s.pause.is_set(), s.leave.is_set())
        # Leaving the group (pause, preemption) always snapshots: the next group restores from it.
        if (preempt or pause) and not captured:
            self._capture(state)
            captured = True
        if captured and self.sharded:
            self._exchange()
        if due or preempt:
            self.save_from_snapshot(state.step, wait=preempt)  # a failure is reported, and we leave
        # Keys reported earlier stay, updated ones change; rank 0's go to the run's metrics stream.
        s.board.progress(state.step, metrics, merge=True, record=self.rank == 0)
        reseed(s.seed, state.step, self.rank)
        if preempt or pause:
            self.drain_vote()  # every rank launched it at this same boundary
        if preempt:
            raise PauseRequested("preemption notice: checkpoint committed, leaving the group")
        if pause:
            raise PauseRequested("membership change at a step boundary")

    def _capture(self, state: TrainState, *, wait: bool = False, live: bool = False) -> None:
        """Snapshot `state` (stable tensors copied in the background unless `wait`; referenced,
        not copied, when `live`)."""
        if self.sharded:
            self.s.buddy.wait()  # pace: the previous snapshot's buddy copy has arrived (or failed)
        items = self._plan_for(state).items()
        self.s.snapshot.capture_items(items.stable, items.volatile, items.values, state.step, items.shards,
                                      origin=(self.rank, self.world_size),
                                      keep_previous=self.sharded and self.world_size > 1, live=live)
        if wait:
            self.s.snapshot.wait()

    def _live(self, state: TrainState) -> bool:
        """Whether this commit's snapshot may reference the live tensors: replicated state on the
        CPU, changed by an optimizer (whose step the version counters see), live snapshots on, and
        no change behind the counters seen so far (the snapshot's checksum: copies from then on)."""
        if self.s.snapshot.violation is not None:
            self.s.live_snapshots = False
        return (self.s.live_snapshots and not self.sharded and state.optimizer is not None
                and self._plan_for(state).on_cpu)

    def _train_seq(self) -> int | None:
        """How many collectives the training group has run (c10d counts them), None if unknown."""
        try:
            return int(self.groups.train._get_sequence_number_for_group())
        except Exception:  # noqa: BLE001 - a group without the counter: no check
            return None

    def _check_window(self) -> None:
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
                        "copied from now on (a failure there must still find this step's state)", self.rank)

    def nodes(self) -> tuple[str, ...]:
        """Every rank's node, in rank order: gathered once per generation on the control plane, at
        the first commit that needs them (the same one on every rank)."""
        if self._nodes is None:
            self._nodes = tuple(self.groups.ctrl.all_gather_json(self.node_id))
        return self._nodes

    def _exchange(self, *, wait: bool = False) -> None:
        """Send the newest snapshot's rows to our buddy and take our ward's, in the background."""
        if self.world_size < 2 or self.groups.xfer is None:
            self.s.snapshot.release_previous()
            return
        snap, buddy = self.s.snapshot, self.s.buddy
        to = reshard.buddies(list(self.nodes()))
        ward = to.index(self.rank)  # the rank whose buddy we are
        which = snap.pin()

        def done() -> None:
            snap.unpin(which)
            if buddy.error is None:
                snap.release_previous()

        buddy.exchange(self.groups.xfer, me=self.rank, world=self.world_size, to=to[self.rank], frm=ward,
                       step=snap.step, mine=[(p, t) for p, t in snap.tensors if p in snap.shards],
                       shards=snap.shards, ready=snap.waiter(), done=done)
        if wait:
            buddy.wait()

    def _plan_for(self, state: TrainState) -> CapturePlan:
        """The capture plan of `state` (built at its first commit in this generation), and the hook
        that notes the training group's collective count when its optimizer steps (live snapshots).
        No hook waits for a copy: a copied snapshot is complete when the commit returns."""
        if self._plan is None or self._plan.state is not state:
            self._drop_plan()
            self._plan = CapturePlan(state)
            if state.optimizer is not None:

                def before_step(*_: Any) -> None:
                    if self.s.live_snapshots:
                        self._seq_at_step = self._train_seq()

                self._hooks.append(state.optimizer.register_step_pre_hook(before_step))
        return self._plan

    def _drop_plan(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._plan = None

    def _mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each key's mean over the ranks that reported it (gathered as JSON on the control plane,
        so that ranks reporting different keys cannot break a collective)."""
        every = self.groups.ctrl.all_gather_json({k: float(v) for k, v in metrics.items()})
        keys = sorted({k for m in every for k in m})
        return {k: sum(m[k] for m in every if k in m) / sum(1 for m in every if k in m) for k in keys}

    def report(self, metrics: dict[str, float]) -> None:
        """Publish metrics without ending a step (e.g. a final evaluation)."""
        self.s.board.progress(self.s.board.get().step, metrics, merge=True)

    def _next_vote(self, pause: bool, preempt: bool) -> tuple[bool, bool]:
        """Agree on pausing. Long steps (and the calibration steps) vote synchronously: a request
        made during a step takes effect at the boundary that ends it. Short steps get the vote
        launched at the previous voting commit and launch the next one asynchronously, so the tiny
        allreduce overlaps the following steps instead of stalling this one. Which of the two is
        agreed at calibration: every rank acts on the same reduced values at the same boundary."""
        self._commits += 1
        if self._commits == 1:
            self._calibration_t0 = time.perf_counter()
        elif self._commits == VOTE_CALIBRATION_STEPS + 1:
            mine = (time.perf_counter() - self._calibration_t0) / VOTE_CALIBRATION_STEPS
            slowest = self.groups.ctrl.allreduce_max([int(mine * 1e6)])[0] / 1e6
            self._vote_every = max(1, min(VOTE_MAX_EVERY, int(VOTE_INTERVAL_S / max(slowest, 1e-6))))
            self._sync_vote = slowest >= SYNC_VOTE_MIN_STEP_S
        if self._commits % self._vote_every != 0:
            return False, False
        if self._sync_vote:
            got = self.groups.ctrl.allreduce_max([int(pause), int(preempt)])
            return bool(got[0]), bool(got[1])
        agreed = (False, False)
        if self._vote is not None:
            got = self._vote.wait()
            agreed = (bool(got[0]), bool(got[1]))
        # Two buffers, alternating: one may still be in flight while the next vote is launched.
        self._vote_bufs.reverse()
        self._vote = self.groups.ctrl.iallreduce_max([int(pause), int(preempt)], out=self._vote_bufs[0])
        return agreed

    def drain_vote(self) -> None:
        """Complete the vote in flight before anything else uses (or destroys) the group."""
        if self._vote is not None:
            vote, self._vote = self._vote, None
            vote.wait()

    # -- checkpoints -----------------------------------------------------------------------
    def save_from_snapshot(self, step: int, *, wait: bool, must_commit: bool = False) -> bool:
        """Checkpoint the snapshot of `step` (collective), writing straight from its buffers: they
        stay pinned until the save ends, and the writer waits for a copy still in flight. With
        `wait`, block until it commits and say whether it did. `must_commit`: the run's newest state
        depends on it (the final save): CheckpointFailedError if it did not commit."""
        snap = self.s.snapshot
        which = snap.pin()
        ck = self.s.checkpointer
        ck.save(snap.checkpoint_state(), step=step, rank=self.rank, world_size=self.world_size,
                 pg=self.groups.ctrl, store=self.groups.ckpt_store, on_commit=self._on_commit,
                 on_failure=self._on_failure, staged=True, ready=snap.waiter(), on_done=lambda: snap.unpin(which))
        if not wait:
            return True
        return self._wait_committed(step, must_commit=must_commit)

    def _wait_committed(self, step: int, *, must_commit: bool) -> bool:
        ck = self.s.checkpointer
        # A final save may take the whole commit timeout; a preemption or a stop has a grace period
        # to fit in, so it gives up sooner (the newest state stays in the survivors' memory).
        timeout = ck.commit_timeout_s if must_commit else LEAVE_SAVE_COLLECTIVES * self.s.run.failure.collective_timeout_s
        if ck.wait(timeout_s=timeout) is not None:
            return True
        reason = ck.last_error or f"not committed within {timeout:g}s"
        if ck.last_error is None:
            self._on_failure(step, reason)  # still in flight: say so now (a failure says so itself)
        if must_commit:
            raise CheckpointFailedError(f"the checkpoint of step {step} was not committed ({reason}); the "
                                        "newest committed checkpoint is older: see `elastic ls URI`")
        return False

    def _on_commit(self, info: Any) -> None:
        self.s.board.emit(Event.CHECKPOINT_COMMITTED, step=info.step,
                          seconds=round(getattr(info, "seconds", 0.0) or 0.0, 4), bytes=info.bytes,
                          world_size=info.world_size, uri=info.uri)

    def _on_failure(self, step: int, reason: str) -> None:
        self.s.board.emit(Event.CHECKPOINT_FAILED, step=step, reason=reason)

    def finish(self) -> None:
        """The function returned: the newest committed state must be durable before we report."""
        self.drain_vote()
        self.save_newest()

    def save_newest(self) -> None:
        """Make the newest state any rank holds durable (the run is ending, finished or not).

        Every decision here comes from values all ranks agreed on, so all take the same branch.
        """
        s, ctrl = self.s, self.groups.ctrl
        s.checkpointer.settle(ctrl, self.world_size)
        if self.sharded or s.snapshot.shards:
            s.snapshot.wait()
            s.buddy.wait()
            found, durable, _ = sharded_state.agree(self.groups, s, s.latest_durable_step(), -1)
            if found is None or found.step <= durable:
                return
            s.checkpointer.save(sharded_state.checkpoint_state(self.groups, s, found), step=found.step,
                                rank=self.rank, world_size=self.world_size, pg=ctrl, store=self.groups.ckpt_store,
                                on_commit=self._on_commit, on_failure=self._on_failure, staged=True)
            self._wait_committed(found.step, must_commit=True)
            return
        agreed = peer_sync.agree(s.snapshot.held_step(), s.latest_durable_step(), ctrl)
        if agreed.best <= agreed.durable:
            return
        peer_sync.newest_state(s.snapshot, agreed, ctrl)  # every rank now holds the newest snapshot
        self.save_from_snapshot(agreed.best, wait=True, must_commit=True)

    def release(self) -> None:
        # The wrapper holds the process group: drop it before the group is destroyed. A copy still
        # in flight completes (its sources no longer change) before anyone reads the snapshot.
        if self._model is not None:
            self._model.remove_hooks()
        self._model = None
        self._vote = None
        self._drop_plan()
        self.s.snapshot.wait()
        self.s.buddy.wait(self.groups.timeout_s + 5)
