"""What a run returns: final metrics, the last committed checkpoint, and its history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from elastic.retry import redact


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
    checkpoint: Any  # elastic.checkpoint.CheckpointInfo | None
    uri: str
    events: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False
    """Stopped on request (SIGINT/SIGTERM to the driver); `error` says whether the newest state was
    committed."""

    def summary(self) -> str:
        """What a run did, in a few lines, ready to print (URIs and errors redacted)."""
        lines = [
            f"{'finished' if self.ok else 'STOPPED' if self.stopped else 'FAILED'}: {self.steps} steps in {self.seconds:.1f}s, "
            f"{self.failures} failure(s), {len(self.recoveries)} recovery/resize event(s)",
        ]
        for r in self.recoveries:
            kind = "recovery" if r.get("failure") else "resize"
            lines.append(f"  {kind}: {r['reason']} -> world size {r['world_size']} in {r['seconds']:.2f}s, "
                         f"lost {r['lost_steps']} step(s)")
        if self.checkpoint is not None:
            lines.append(f"  last checkpoint: step {self.checkpoint.step} at {self.checkpoint.uri}")
        if self.metrics:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.metrics.items()))
            lines.append(f"  final metrics: {shown}")
        if self.error:
            lines.append(f"  error: {self.error.splitlines()[-1] if self.error else ''}")
        return redact("\n".join(lines))
