"""Human-readable progress for a run: one line every few seconds, and each membership event as it
happens (the events marked `shown` in elastic._internal.events.Event)."""

from __future__ import annotations

import statistics
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from elastic._internal.events import Event, format_event

if TYPE_CHECKING:
    from elastic._internal.supervisor.tracking import Progress

_SHOWN = {e.value for e in Event if e.shown}


class ProgressPrinter:
    def __init__(self, interval_s: float = 5.0, out: TextIO | None = None):
        self.interval_s = interval_s
        self.out = out or sys.stdout
        self._last = 0.0

    def events(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            # One `restored` line per group (rank 0's), not one per rank.
            if ev.get("event") in _SHOWN and not (ev.get("event") == Event.RESTORED and ev.get("rank") not in (0, None)):
                print(format_event(ev, brief=True), file=self.out, flush=True)

    def progress(self, p: Progress | None, *, force: bool = False) -> None:
        """One line from the supervisor's snapshot (None: it could not be read this time)."""
        now = time.monotonic()
        if p is None or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        if p.state != "running" and not force:
            return
        loss_s = f"{p.loss:.4f}" if isinstance(p.loss, (int, float)) else "-"
        print(f"[elastic] step {p.step:>6}  loss {loss_s}  {p.steps_per_s:6.1f} steps/s  "
              f"world {p.world_size}  gen {p.generation}  {goodput(p)}",
              file=self.out, flush=True)


def goodput(p: Progress) -> str:
    """`ETTR 0.97 · 3 failures (median 0.4 s, max 2.1 s) · standbys 1` from a progress snapshot (the
    costs are those of the failures recovered from so far)."""
    n = p.failures
    failures = f"{n} failure{'' if n == 1 else 's'}"
    costs = p.failure_cost_s
    if costs:
        failures += f" (median {statistics.median(costs):.1f} s, max {max(costs):.1f} s)"
    head = [f"ETTR {p.ettr:.2f}"] if isinstance(p.ettr, (int, float)) else []
    return " · ".join([*head, failures, f"standbys {p.standbys}"])
