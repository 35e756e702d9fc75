"""Human-readable progress for a run: one line every few seconds, and each membership event as it
happens."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

_SHOWN = {
    "run_started", "group_built", "group_failed", "worker_failed", "worker_left", "recovered", "resized", "preemption_notice",
    "checkpoint_committed", "restored", "waiting_for_workers", "run_finished", "run_failed",
}


def format_event(ev: dict[str, Any]) -> str:
    name = ev.get("event", "?")
    fields = {k: v for k, v in ev.items() if k not in ("event", "time", "members", "uri", "node_id") and v is not None}
    if isinstance(fields.get("error"), str):
        fields["error"] = fields["error"].strip().splitlines()[-1]
    if name == "group_built":
        fields["pids"] = [m.get("pid") for m in ev.get("members", [])]
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    stamp = time.strftime("%H:%M:%S", time.localtime(ev.get("time", time.time())))
    return f"[elastic {stamp}] {name:<20} {text}"


class ProgressPrinter:
    def __init__(self, interval_s: float = 5.0, out: TextIO | None = None):
        self.interval_s = interval_s
        self.out = out or sys.stdout
        self._last = 0.0

    def events(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            if ev.get("event") in _SHOWN and not (ev.get("event") == "restored" and ev.get("rank") not in (0, None)):
                print(format_event(ev), file=self.out, flush=True)

    def progress(self, p: dict[str, Any], *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        if p.get("state") not in ("running",) and not force:
            return
        loss = p.get("loss")
        loss_s = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        print(f"[elastic] step {p.get('step', 0):>6}  loss {loss_s}  {p.get('steps_per_s', 0.0):6.1f} steps/s  "
              f"world {p.get('world_size', 0)}  gen {p.get('generation', 0)}  "
              f"failures {p.get('failures', 0)}", file=self.out, flush=True)
