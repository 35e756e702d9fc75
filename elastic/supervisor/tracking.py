"""The supervisor's bookkeeping of a run: progress for the driver, the training rate, and the open
incidents (a failure or a resize) until the group first steps past the state it restored.

Each piece has one job; the controller feeds them what the workers answered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

STEP_RATE_WINDOW_S = 1.0
"""The training rate (steps/s) shown in progress lines is measured over windows of this length."""


@dataclass
class Progress:
    """What the driver shows: a snapshot, copied on each progress call."""

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


@dataclass
class Incident:
    reason: str
    since: float
    step_before: int
    is_failure: bool
    restored_step: int | None = None
    lost_steps: int = 0  # as the restoring ranks measured it (the supervisor's view lags a poll)


class Incidents:
    """Failures and resizes in progress. A failure during a recovery opens a second one; each is
    closed, with its own record, when the group first steps past the state it restored."""

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self.open: list[Incident] = []

    def start(self, reason: str, *, is_failure: bool, step_before: int) -> None:
        self.open.append(Incident(reason=reason, since=self._clock(), step_before=step_before,
                                  is_failure=is_failure))

    def restored(self, step: int, lost_steps: int) -> None:
        """A rank of the current generation restored `step`, having lost `lost_steps`."""
        for inc in self.open:
            inc.restored_step = step
            inc.lost_steps = max(inc.lost_steps, lost_steps)

    def close_past(self, step: int, *, generation: int, world_size: int) -> list[dict[str, Any]]:
        """Close every incident whose group stepped past its restored state; their records."""
        now = self._clock()
        done = [i for i in self.open if i.restored_step is not None and step > i.restored_step]
        self.open = [i for i in self.open if i not in done]
        return [{"reason": i.reason, "seconds": round(now - i.since, 4),
                 "lost_steps": max(i.lost_steps, i.step_before - (i.restored_step or 0)),
                 "generation": generation, "world_size": world_size, "failure": i.is_failure} for i in done]
