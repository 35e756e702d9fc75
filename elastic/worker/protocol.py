"""What crosses the actor boundary between supervisor and workers: frozen, picklable records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Assignment:
    """One rank's place in one generation of the process group."""

    generation: int
    rank: int
    world_size: int
    store_host: str
    store_port: int
    backend: str
    collective_timeout_s: float
    local_rank: int = 0
    mode: str = "train"  # train | save (make the newest in-memory state durable, then stop)


@dataclass(frozen=True)
class WorkerPoll:
    """A worker's answer to a health poll."""

    state: str  # idle | running | parked | finished | failed
    generation: int
    step: int
    progress_age_s: float  # seconds since the last commit (or since the generation started)
    waiting_in_collective_s: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    fatal: bool = False  # a bad-input error (exit 2): retrying cannot help
    preempted: bool = False
    park_reason: str | None = None  # "pause": left at an agreed step boundary; "broken": the group broke


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    node_id: str
    ip: str
    background_startup: bool = False  # its start-up ran at idle CPU priority (elastic.worker.priority)
