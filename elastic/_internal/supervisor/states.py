"""The supervisor's states: one enum whose members carry their properties, one small frozen class
per state holding that state's payload.

    STARTING ──▶ RUNNING ──▶ FINISHED
        │          │  ▲
        │          ▼  │
        │      RESTARTING (a worker died, froze, hung or raised: counts against max_failures)
        │      RESIZING   (nodes joined, a preemption notice, a crowded rank hands over: does not count)
        ▼          │
      FAILED ◀─────┘ (budget spent, user error, below min_workers too long, location taken over)

    any state ──▶ STOPPING ──▶ STOPPED   (SIGINT/SIGTERM to the driver: commit the newest state, end)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from elastic._internal.supervisor.decisions import ResizeReason


class StateType(enum.Enum):
    STARTING = ("starting", False)
    RUNNING = ("running", False)
    RESTARTING = ("restarting", False)
    RESIZING = ("resizing", False)
    STOPPING = ("stopping", False)
    FINISHED = ("finished", True)
    FAILED = ("failed", True)
    STOPPED = ("stopped", True)

    def __init__(self, label: str, terminal: bool):
        self.label = label
        self.terminal = terminal


@dataclass(frozen=True)
class State:
    type: StateType

    def is_terminal(self) -> bool:
        return self.type.terminal


@dataclass(frozen=True)
class Starting(State):
    type: StateType = StateType.STARTING


@dataclass(frozen=True)
class Running(State):
    generation: int = 0
    type: StateType = StateType.RUNNING


@dataclass(frozen=True)
class Restarting(State):
    reason: str = ""
    failed_workers: tuple[int, ...] = ()
    since: float = 0.0  # when the failure was detected (supervisor clock)
    type: StateType = StateType.RESTARTING


@dataclass(frozen=True)
class Resizing(State):
    reason: ResizeReason = ResizeReason.GROW
    leaving_workers: tuple[int, ...] = ()
    since: float = 0.0
    type: StateType = StateType.RESIZING


@dataclass(frozen=True)
class Finished(State):
    type: StateType = StateType.FINISHED


@dataclass(frozen=True)
class Failed(State):
    error: str = ""
    exit_code: int = 1
    type: StateType = StateType.FAILED


@dataclass(frozen=True)
class Stopping(State):
    signal: int = 15
    survivors: tuple[int, ...] = ()
    """Members that hold the newest state when no group is running (a stop during a rebuild)."""
    type: StateType = StateType.STOPPING


@dataclass(frozen=True)
class Stopped(State):
    """Stopped on request (SIGINT/SIGTERM to the driver): exit 128 + signal."""

    message: str = ""
    exit_code: int = 143
    committed: bool = True
    """The newest state the workers held was committed before they stopped."""
    type: StateType = StateType.STOPPED
