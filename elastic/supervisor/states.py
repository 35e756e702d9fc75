"""The supervisor's states: one enum whose members carry their properties, one small frozen class
per state holding that state's payload.

    STARTING ──▶ RUNNING ──▶ FINISHED
        │          │  ▲
        │          ▼  │
        │      RESTARTING (a worker died, froze, hung or raised: counts against max_failures)
        │      RESIZING   (nodes joined, or a preemption notice: does not count)
        ▼          │
      FAILED ◀─────┘ (budget spent, user error, below min_workers too long)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StateType(enum.Enum):
    STARTING = ("starting", False)
    RUNNING = ("running", False)
    RESTARTING = ("restarting", False)
    RESIZING = ("resizing", False)
    FINISHED = ("finished", True)
    FAILED = ("failed", True)

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
    reason: str = ""  # "grow" | "preemption"
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
