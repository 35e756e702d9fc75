"""The pause vote: at a step boundary every rank agrees whether to pause (a resize) or to leave (a
preemption, a stop), so that all of them act at the same step.

The vote is a tiny allreduce on the control plane. Its cadence is agreed once per generation, after
VOTE_CALIBRATION_STEPS commits, from the slowest rank's step time: long steps vote at every commit,
synchronously; short steps vote every few commits and pipeline the vote (launched at one voting
commit, read at the next), so that the round trip overlaps training instead of stalling it.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from elastic._internal.collectives import Pending
from elastic.errors import WorkerGroupError
from elastic._internal.worker.groups import ProcessGroups

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


class PauseRequested(WorkerGroupError):
    """Unwinds the training function at a step boundary that every rank agreed on."""


class PauseVote:
    """One generation's votes, on its control plane; `clock` times the calibration steps."""

    def __init__(self, groups: ProcessGroups, *, clock: Callable[[], float] = time.perf_counter):
        self.groups = groups
        self._clock = clock
        self._pending: Pending | None = None
        self._bufs = [torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]
        self._commits = 0
        self._every = 1
        self._sync = True
        """Vote synchronously (SYNC_VOTE_MIN_STEP_S); agreed at calibration, the same on every rank."""
        self._calibration_t0 = 0.0

    def next(self, pause: bool, preempt: bool) -> tuple[bool, bool]:
        """Agree on pausing, at a commit. Long steps (and the calibration steps) vote synchronously:
        a request made during a step takes effect at the boundary that ends it. Short steps get the
        vote launched at the previous voting commit and launch the next one asynchronously, so the
        tiny allreduce overlaps the following steps instead of stalling this one. Which of the two
        is agreed at calibration: every rank acts on the same reduced values at the same boundary."""
        self._commits += 1
        if self._commits == 1:
            self._calibration_t0 = self._clock()
        elif self._commits == VOTE_CALIBRATION_STEPS + 1:
            self._calibrate()
        if self._commits % self._every != 0:
            return False, False
        ctrl = self.groups.ctrl
        if self._sync:
            got = ctrl.allreduce_max([int(pause), int(preempt)])
            return bool(got[0]), bool(got[1])
        agreed = (False, False)
        if self._pending is not None:
            got = self._pending.wait()
            agreed = (bool(got[0]), bool(got[1]))
        # Two buffers, alternating: one may still be in flight while the next vote is launched.
        self._bufs.reverse()
        self._pending = ctrl.iallreduce_max([int(pause), int(preempt)], out=self._bufs[0])
        return agreed

    def _calibrate(self) -> None:
        """The cadence, from the slowest rank's mean step time over the calibration steps."""
        mine = (self._clock() - self._calibration_t0) / VOTE_CALIBRATION_STEPS
        slowest = self.groups.ctrl.allreduce_max([int(mine * 1e6)])[0] / 1e6
        self._every = max(1, min(VOTE_MAX_EVERY, int(VOTE_INTERVAL_S / max(slowest, 1e-6))))
        self._sync = slowest >= SYNC_VOTE_MIN_STEP_S

    def drain(self) -> None:
        """Complete the vote in flight before anything else uses (or destroys) the group."""
        if self._pending is not None:
            vote, self._pending = self._pending, None
            vote.wait()

    def forget(self) -> None:
        """Drop the vote in flight without waiting (the group is being released)."""
        self._pending = None
