"""Ending a step (ctx.commit): step += 1, snapshot the state, publish metrics, checkpoint when due,
and leave the group at a boundary every rank agreed on (a resize, a preemption, a stop).

The order matters: the step's state is taken before any collective of the commit, so that a
failure in one still finds it.
"""

from __future__ import annotations

from elastic.train_state import TrainState
from elastic._internal.worker.groups import ProcessGroups
from elastic._internal.worker.model_prep import ModelPrep
from elastic._internal.worker.saver import Saver
from elastic._internal.worker.seeding import reseed
from elastic._internal.worker.services import Services
from elastic._internal.worker.snapshotter import Snapshotter
from elastic._internal.worker.vote import PauseRequested, PauseVote


class Committer:
    """One generation's commits."""

    def __init__(self, groups: ProcessGroups, services: Services, model: ModelPrep, snapshots: Snapshotter,
                 vote: PauseVote, saver: Saver):
        self.groups = groups
        self.s = services
        self.model = model
        self.snapshots = snapshots
        self.vote = vote
        self.saver = saver

    def commit(self, state: TrainState, metrics: dict[str, float] | None = None, *, reduce: bool = False) -> None:
        """End a step: step += 1; remember the state; checkpoint when due; apply agreed pauses."""
        s, rank = self.s, self.groups.rank
        state.step += 1
        self.snapshots.check_window()
        live = self.snapshots.live(state)
        due = s.checkpoint_due(state.step)
        # This step's state is taken before any collective of the commit, so that a failure in one
        # finds it. Live: referenced (nothing to copy); a periodic checkpoint writes in the
        # background while training goes on, so it always gets a copy.
        captured = live or due or state.step % s.run.failure.snapshot_every_n_steps == 0
        if captured:
            self.snapshots.take(state, live=live and not due)
        if metrics and reduce:
            metrics = self._mean(metrics)
        pause, preempt = self.vote.next(s.pause.is_set(), s.leave.is_set())
        # Leaving the group (pause, preemption) always snapshots: the next group restores from it.
        if (preempt or pause) and not captured:
            self.snapshots.take(state)
        if due or preempt:
            self.saver.save_from_snapshot(state.step, wait=preempt)  # a failure is reported, and we leave
        # Keys reported earlier stay, updated ones change; rank 0's go to the run's metrics stream.
        s.board.progress(state.step, metrics, merge=True, record=rank == 0)
        reseed(s.seed, state.step, rank)
        if preempt or pause:
            self.vote.drain()  # every rank launched it at this same boundary
        if preempt:
            raise PauseRequested("preemption notice: checkpoint committed, leaving the group")
        if pause:
            raise PauseRequested("membership change at a step boundary")

    def _mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each key's mean over the ranks that reported it (gathered as JSON on the control plane,
        so that ranks reporting different keys cannot break a collective)."""
        every = self.groups.ctrl.all_gather_json({k: float(v) for k, v in metrics.items()})
        keys = sorted({k for m in every for k in m})
        return {k: sum(m[k] for m in every if k in m) / sum(1 for m in every if k in m) for k in keys}
