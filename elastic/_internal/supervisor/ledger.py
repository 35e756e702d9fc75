"""The run's accounts: what the workers said, the steps committed and restored, the failures, the
recoveries and the goodput.

The ledger takes in every poll the controller makes (`absorb`): it forwards the workers' events,
keeps the newest committed step and where each rank restored from (typed WorkerPoll fields, never
parsed from events), counts failures, opens and closes incidents (tracking.py) and keeps the
progress snapshot the driver reads. It decides nothing and touches no actor.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from elastic._internal.events import Event
from elastic._internal.protocol import ErrorSignature, WorkerPoll, WorkerState
from elastic._internal.supervisor import policy as pol
from elastic._internal.supervisor.tracking import Incidents, Progress, Recovery, StepRate

if TYPE_CHECKING:
    from elastic._internal.supervisor.controller import Controller


class Ledger:
    def __init__(self, ctl: Controller, clock: Callable[[], float]):
        self._ctl = ctl
        self.failures = 0
        self.consecutive_failures = 0
        self._last_error: tuple[int, ErrorSignature | None] = (-2, None)
        """(generation, the error every rank raised in it) of the last failed generation (policy.shared_error)."""
        self.recoveries: list[Recovery] = []
        self.progress = Progress()
        self.incidents = Incidents(clock)
        self._rate = StepRate(clock)
        self.last_polls: dict[int, pol.Poll] = {}
        self.committed_step = -1
        """The newest step a checkpoint of this run committed (WorkerPoll.committed_step)."""
        self._restored_in: dict[int, int] = {}
        """worker id -> the generation whose WorkerPoll.restored the incidents were told of last."""
        self.newest_step = 0
        """The newest step any worker reported (parked ones included: they hold it)."""
        self.storage_step: Callable[[], int] | None = None
        """The newest step committed on storage (-1: none), read when a stop ends the run, so that what
        the run says is what storage holds (the supervisor actor sets it; the unit tests need none)."""
        self.first_built_at: float | None = None
        """When the run's first group was built."""
        self.first_step_at: float | None = None
        """When the run's first group first stepped: standbys start policy.standby_after_s later."""
        self.failure_times: list[float] = []
        """When each failure was seen (what sizes the standby pool)."""

    def show(self, **changes: Any) -> None:
        """Replace the progress snapshot (the driver reads it from another thread)."""
        self.progress = replace(self.progress, **changes)

    def count_failure(self, reason: str) -> None:
        """A failure: counted (in a row too), its time kept, an incident opened."""
        self.failure_times.append(self._ctl.clock())
        self.failures += 1
        self.consecutive_failures += 1
        self.show(failures=self.failures)
        self.incidents.start(reason, is_failure=True, step_before=self.progress.step)

    def built(self) -> None:
        """A group was built: the first one's time is kept, the training rate starts over."""
        if self.first_built_at is None:
            self.first_built_at = self._ctl.clock()
        self._rate.reset()

    def repeated_error(self) -> tuple[ErrorSignature | None, ...]:
        """The error every member raised in this generation, after the one of the generation just
        before when that one failed too (what policy.after_failure compares)."""
        roster = self._ctl.roster
        mine = pol.shared_error({w: self.last_polls.get(w) for w in roster.members}, roster.generation)
        before_gen, before = self._last_error
        self._last_error = (roster.generation, mine)
        return (before, mine) if before_gen == roster.generation - 1 else (mine,)

    def absorb(self, polls: dict[int, pol.Poll]) -> None:
        """Take in what the workers said: their events, their progress, and what it closes."""
        ctl = self._ctl
        self.last_polls.update(polls)
        answers = {w: p for w, p in polls.items() if isinstance(p, WorkerPoll)}
        ctl.roster.forward_events(answers)
        self._take_facts(answers)
        if ctl.metrics is not None:
            ctl.metrics.extend([{"step": step, "time": t, **m} for p in answers.values() for step, t, m in p.records])
        self.newest_step = max([self.newest_step, *(p.step for p in answers.values())])
        steps = [p.step for p in answers.values()
                 if p.generation == ctl.roster.generation and p.state in (WorkerState.RUNNING, WorkerState.FINISHED)]
        members = ctl.roster.members
        if members and (p := answers.get(members[0])) is not None and p.metrics:
            self.show(metrics=dict(p.metrics), loss=p.metrics.get("loss"))
        self.show(standbys=len(ctl.group.standbys()))
        if not steps:
            self._account()
            return
        step = max(steps)
        if self.first_step_at is None and self.first_built_at is not None and step > self.progress.step:
            self.first_step_at = ctl.clock()
        steps_per_s = self._rate.observe(step)
        closed = self.close_incidents(step)
        self.show(steps_per_s=steps_per_s, recoveries=len(self.recoveries),
                  step=step if self.incidents.open or closed else max(self.progress.step, step))

    def _take_facts(self, answers: dict[int, WorkerPoll]) -> None:
        """What the workers' typed fields say: the newest committed step, and where each rank of this
        generation restored from (told to the open incidents once per rank and generation)."""
        generation = self._ctl.roster.generation
        for wid, poll in answers.items():
            self.committed_step = max(self.committed_step, poll.committed_step)
            r = poll.restored
            if r is not None and r.generation == generation and self._restored_in.get(wid) != r.generation:
                self._restored_in[wid] = r.generation
                self.incidents.restored(r.step, r.lost_steps)

    def close_incidents(self, step: int | None = None, *, finished: bool = False) -> list[Recovery]:
        """Close the incidents the group has stepped beyond (all of them when the run finished) and
        emit their records."""
        roster = self._ctl.roster
        closed = self.incidents.close_past(self.progress.step if step is None else step, generation=roster.generation,
                                           world_size=len(roster.members), finished=finished)
        self._account()
        ettr = None if self.progress.ettr is None else round(self.progress.ettr, 4)
        closed = [replace(rec, ettr=ettr) for rec in closed]
        for rec in closed:
            self.recoveries.append(rec)
            self._ctl.events.emit(Event.RECOVERED if rec.failure else Event.RESIZED, **rec.as_dict())
            if rec.failure:
                self.consecutive_failures = 0
                self.show(failure_cost_s=(*self.progress.failure_cost_s, rec.cost_s))
        return closed

    def _account(self) -> None:
        """The run's goodput so far, for progress: the time its failures cost and its ETTR."""
        if self.first_step_at is not None:  # the time before the first step is start-up, not lost
            self.show(lost_s=round(self.incidents.lost_s(self.first_step_at), 4),
                      ettr=self.incidents.ettr(self.first_step_at))
