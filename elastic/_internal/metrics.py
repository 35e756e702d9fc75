"""The run's metrics stream: URI/metrics.jsonl, one line per committed step,
{"step": S, "time": unix seconds, **metrics} — rank 0's metrics, or each key's mean over the ranks
when the step was committed with `reduce=True`.

Kept apart from events.jsonl so that the event log stays small. A step trained twice (a failure
rolled the group back past it) appears twice: readers keep the last line of each step.
"""

from __future__ import annotations

from typing import Any

from elastic._internal import jsonlog
from elastic._internal.events import parse_lines
from elastic._internal.storage import RunLocation

METRICS_NAME = "metrics"
MEMORY_METRICS = 10_000
"""Records the supervisor keeps in memory for the driver between two of its progress calls."""


class MetricsLog(jsonlog.JsonLinesLog):
    def __init__(self, where: str | RunLocation, **kw: Any):
        super().__init__(where, METRICS_NAME, keep=MEMORY_METRICS, **kw)


def read_metrics(uri: str) -> list[dict[str, Any]]:
    """Every step's metrics, in step order, the last record of each step."""
    by_step: dict[int, dict[str, Any]] = {}
    for rec in parse_lines("".join(line + "\n" for line in jsonlog.read_lines(uri, METRICS_NAME))):
        if isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
