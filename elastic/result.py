"""What a run returns: final metrics, the last committed checkpoint, and its history."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from elastic._internal.retry import redact


@dataclass(frozen=True)
class Result:
    ok: bool
    exit_code: int
    error: str | None
    metrics: dict[str, float]
    steps: int
    seconds: float
    failures: int
    recoveries: list[dict[str, Any]]
    checkpoint: Any  # elastic._internal.checkpoint.CheckpointInfo | None
    uri: str
    events: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    """Stopped on request (SIGINT/SIGTERM to the driver); `error` says whether the newest state was
    committed."""
    ettr: float | None = None
    """The effective training time ratio: the share of the time since the first step that failures did
    not cost; None when the run never stepped."""
    lost_s: float = 0.0
    """Seconds the failures cost, overlapping ones counted once."""

    @property
    def failure_costs(self) -> list[float]:
        """What each recovered failure cost: seconds from it to a step beyond the newest step before it."""
        return [float(r["cost_s"]) for r in self.recoveries if r.get("failure") and r.get("cost_s") is not None]

    def goodput(self) -> str | None:
        """One line on what churn cost: failures, median/p90/max cost, time lost, ETTR (None when the
        run never stepped)."""
        if self.ettr is None:
            return None
        costs = sorted(self.failure_costs)
        if not costs:
            head = f"{self.failures} failure(s)" if self.failures else "no failures"
        else:
            p90 = costs[max(0, math.ceil(0.9 * len(costs)) - 1)]
            head = (f"{self.failures} failure(s) cost median {statistics.median(costs):.2f}s, p90 {p90:.2f}s, "
                    f"max {costs[-1]:.2f}s")
        return f"goodput: {head}; {self.lost_s:.2f}s lost in all; ETTR {self.ettr:.3f}"

    def summary(self) -> str:
        """What a run did, in a few lines, ready to print (URIs and errors redacted)."""
        lines = [
            f"{'finished' if self.ok else 'STOPPED' if self.stopped else 'FAILED'}: {self.steps} steps in {self.seconds:.1f}s, "
            f"{self.failures} failure(s), {len(self.recoveries)} recovery/resize event(s)",
        ]
        for r in self.recoveries:
            kind = "recovery" if r.get("failure") else "resize"
            cost = f", cost {r['cost_s']:.2f}s" if r.get("cost_s") is not None else ""
            lines.append(f"  {kind}: {r['reason']} -> world size {r['world_size']} in {r['seconds']:.2f}s{cost}, "
                         f"lost {r['lost_steps']} step(s)")
        if (goodput := self.goodput()) is not None:
            lines.append(f"  {goodput}")
        if self.checkpoint is not None:
            lines.append(f"  last checkpoint: step {self.checkpoint.step} at {self.checkpoint.uri}")
        if self.metrics:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.metrics.items()))
            lines.append(f"  final metrics: {shown}")
        if self.error:
            lines.append(f"  error: {self.error.splitlines()[-1] if self.error else ''}")
        return redact("\n".join(lines))
