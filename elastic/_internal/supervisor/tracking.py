"""The supervisor's bookkeeping of a run: progress for the driver, the training rate, the open
incidents (a failure or a resize) until the group steps beyond the newest step before them, and the
run's goodput (what each failure cost, the ETTR so far).

Each piece has one job; the controller feeds them what the workers answered.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

STEP_RATE_WINDOW_S = 1.0
"""The training rate (steps/s) shown in progress lines is measured over windows of this length."""


@dataclass(frozen=True)
class Progress:
    """What the driver shows: a snapshot the controller replaces as a whole (dataclasses.replace), so
    that the driver's progress call, from another thread, never sees half of an update."""

    state: str = "starting"
    step: int = 0
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    steps_per_s: float = 0.0
    world_size: int = 0
    generation: int = -1
    failures: int = 0
    recoveries: int = 0
    started: float = field(default_factory=time.time)
    ettr: float | None = None
    """The effective training time ratio so far: the share of the wall time since the first step that
    no failure cost (see Incidents.ettr); None before the first step."""
    lost_s: float = 0.0
    """Seconds the failures cost so far, overlapping ones counted once (the open ones up to now)."""
    failure_cost_s: tuple[float, ...] = ()
    """What each recovered failure cost, in order: seconds from the failure to a step beyond the
    newest step before it."""
    standbys: int = 0
    """Standbys ready to replace a lost worker."""


class StepRate:
    """Steps per second over windows of STEP_RATE_WINDOW_S (restarted with each generation)."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self._mark: tuple[float, int] | None = None
        self.value = 0.0

    def reset(self) -> None:
        self._mark = None

    def observe(self, step: int) -> float:
        now = self._clock()
        if self._mark is None:
            self._mark = (now, step)
        elif now - self._mark[0] >= STEP_RATE_WINDOW_S:
            t0, s0 = self._mark
            self.value = (step - s0) / (now - t0)
            self._mark = (now, step)
        return self.value


@dataclass(frozen=True)
class Recovery:
    """A closed incident: a failure recovered from, or a resize done (the `recovered`/`resized` event's
    fields; Result.recoveries holds them as dicts)."""

    reason: str
    seconds: float
    """From the incident to the group's first step past the state it restored."""
    lost_steps: int
    generation: int
    world_size: int
    failure: bool
    """A failure (counted against max_failures), not a resize."""
    cost_s: float
    """From the incident to the first step beyond the newest step before it."""
    ettr: float | None = None
    """The run's ETTR when it closed."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Incident:
    reason: str
    since: float
    step_before: int
    is_failure: bool
    newest_before: int = 0
    """The newest step the group had reached before it (an earlier incident's included): the group
    has recovered once it completes a step beyond this one."""
    restored_step: int | None = None
    lost_steps: int = 0  # as the restoring ranks measured it (the supervisor's view lags a poll)
    resumed_s: float | None = None
    """Seconds from the incident to the group's first step past the state it restored."""


def union_s(intervals: list[tuple[float, float]], *, since: float = float("-inf")) -> float:
    """The time the intervals cover from `since` on, overlaps counted once."""
    total, end = 0.0, since
    for a, b in sorted(intervals):
        a = max(a, end)
        if b > a:
            total, end = total + b - a, b
    return total


class Incidents:
    """Failures and resizes in progress. A failure during a recovery opens a second one; each is
    closed, with its own record, when the group completes a step beyond the newest step before it
    (and past the state it restored). What the failures cost adds up to the run's ETTR."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self.open: list[Incident] = []
        self._newest = 0
        """The newest step the group has reached."""
        self._lost: list[tuple[float, float]] = []
        """[seen, recovered] of each closed failure."""

    def start(self, reason: str, *, is_failure: bool, step_before: int) -> None:
        self._newest = max(self._newest, step_before)
        self.open.append(Incident(reason=reason, since=self._clock(), step_before=step_before,
                                  is_failure=is_failure, newest_before=self._newest))

    @property
    def restoring(self) -> bool:
        """Whether an open incident's group has not yet stepped past the state it restored."""
        return any(i.resumed_s is None for i in self.open)

    def lost_s(self, since: float = float("-inf")) -> float:
        """Seconds the failures cost from `since` on: the union of [seen, recovered] of each (an open
        one up to now), so that a failure during another's recovery is not counted twice."""
        now = self._clock()
        return union_s(self._lost + [(i.since, now) for i in self.open if i.is_failure], since=since)

    def ettr(self, first_step_at: float | None) -> float | None:
        """The effective training time ratio since the first step: (wall - lost) / wall; None before it."""
        if first_step_at is None:
            return None
        wall = self._clock() - first_step_at
        return 1.0 if wall <= 0 else max(0.0, wall - self.lost_s(first_step_at)) / wall

    def restored(self, step: int, lost_steps: int) -> None:
        """A rank of the current generation restored `step`, having lost `lost_steps`."""
        for inc in self.open:
            inc.restored_step = step
            inc.lost_steps = max(inc.lost_steps, lost_steps)

    def close_past(self, step: int, *, generation: int, world_size: int,
                   finished: bool = False) -> list[Recovery]:
        """The group completed `step`: close every incident it stepped beyond (all of them once the
        run `finished`: a failure at its last step has no step beyond); their records (`seconds`: to
        the first step past the restored state; `cost_s`: to this step)."""
        now = self._clock()
        for i in self.open:
            if i.resumed_s is None and i.restored_step is not None and (step > i.restored_step or finished):
                i.resumed_s = now - i.since
        self._newest = max(self._newest, step)
        done = [i for i in self.open if i.resumed_s is not None
                and (finished or step > max(i.newest_before, i.restored_step or 0))]
        self.open = [i for i in self.open if i not in done]
        self._lost += [(i.since, now) for i in done if i.is_failure]
        return [Recovery(reason=i.reason, seconds=round(i.resumed_s or 0.0, 4),
                         lost_steps=max(i.lost_steps, i.step_before - (i.restored_step or 0)),
                         generation=generation, world_size=world_size, failure=i.is_failure,
                         cost_s=round(now - i.since, 4)) for i in done]
