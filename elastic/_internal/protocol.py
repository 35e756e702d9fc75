"""What crosses the actor boundary between supervisor and workers: typed states and frozen records.

The enums are `str` enums so that they compare equal to (and serialize as) their names, which
keeps events on disk and logs readable; code compares against the members, never free strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class WorkerState(str, enum.Enum):
    """Where a worker's current generation stands."""

    IDLE = "idle"  # no assignment yet (a spare, or a worker between generations)
    RUNNING = "running"  # the training function runs (or the final save does)
    PARKED = "parked"  # left the group without finishing: see ParkReason
    FINISHED = "finished"  # the function returned and the final state is durable
    FAILED = "failed"  # an error that is not a broken group: see WorkerError.kind

    def __str__(self) -> str:
        return self.value


class ParkReason(str, enum.Enum):
    """Why a worker left its group without finishing."""

    PAUSE = "pause"  # at a step boundary every rank agreed on (resize, preemption, stop)
    BROKEN = "broken"  # a collective failed under it: a peer died, froze or cut its connections

    def __str__(self) -> str:
        return self.value


class FailureKind(str, enum.Enum):
    """What a worker's error means for the run."""

    USER = "user"  # user code raised: counts against max_failures, the rank is replaced
    FATAL = "fatal"  # bad input (a checkpoint of another model, no checkpoint that verifies):
    # retrying cannot help, the run ends with the error's exit code (elastic.errors)
    GROUP = "group"  # a consequence of a broken process group, not a fault of this rank

    def __str__(self) -> str:
        return self.value


class AssignmentMode(str, enum.Enum):
    """What a generation is built for."""

    TRAIN = "train"  # run the training function
    SAVE = "save"  # make the newest in-memory state durable, then stop (a run that ends unfinished)

    def __str__(self) -> str:
        return self.value


class PollFailure(str, enum.Enum):
    """A poll that got no answer."""

    DEAD = "dead"  # the actor died (Ray says so)
    UNRESPONSIVE = "unresponsive"  # alive but did not answer within poll_timeout_s (frozen)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ErrorSignature:
    """Where and how user code raised, comparable across ranks and generations: the same one on
    every rank, generation after generation, is a bug that restarting cannot fix."""

    type: str
    """The exception's class name, e.g. "KeyError"."""
    message: str
    """The first line of its message."""
    where: str
    """file:line of the innermost frame of the user's code (not elastic's, torch's or the stdlib's)."""
    step: int
    """The step the rank was taking (its last committed step + 1)."""

    def describe(self) -> str:
        return f"{self.type}: {self.message} at {self.where} (step {self.step})"


@dataclass(frozen=True)
class WorkerError:
    """An error a worker reports: its kind decides what the supervisor does about it."""

    kind: FailureKind
    message: str
    """One line for a broken group; the traceback for user code."""
    exit_code: int = 2
    """The run's exit code when a FATAL error ends it: the error class's (elastic.errors.exit_code_of:
    2 for bad input, 1 for a corrupt or uncommitted checkpoint or a location taken over)."""
    signature: ErrorSignature | None = None
    """A USER error's type, user frame and step (elastic._internal.worker.failures.signature)."""


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
    mode: AssignmentMode = AssignmentMode.TRAIN
    local_world_size: int = 1
    """Ranks of this generation on this rank's node."""
    store_prefix: str = ""
    """The run's secret key prefix on the rendezvous store (handed over through Ray, never logged)."""
    gpu_ids: tuple[str, ...] | None = ()
    """GPUs reserved for this worker by another actor (a promoted standby reserves none itself);
    None when that reservation was not placed in time (the worker cannot train: its generation fails)."""
    rendezvous_timeout_s: float = 30.0
    """Bound on the wait for the generation's other ranks to arrive and exchange addresses (the
    supervisor's failure-detection bound): a member lost during the build costs this at most."""
    node_id: str = ""
    """This rank's node (the ranks gather each other's when they need them: buddies go on other
    nodes). Not every rank's: an assignment stays small at any world size."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", AssignmentMode(self.mode))  # the value ("save") is accepted too


@dataclass(frozen=True)
class Restored:
    """Where a rank's generation restarted from (also logged as a `restored` event)."""

    generation: int
    step: int
    """The step of the state it restored (0: a fresh start)."""
    lost_steps: int = 0
    """Committed steps it could not restore (its newest committed step minus `step`)."""


@dataclass(frozen=True)
class WorkerPoll:
    """A worker's answer to a health poll."""

    state: WorkerState
    generation: int
    step: int
    progress_age_s: float  # seconds since the last commit (or since the generation started)
    waiting_in_collective_s: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    failure: WorkerError | None = None
    preempted: bool = False
    park_reason: ParkReason | None = None
    records: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)
    """(step, unix time, metrics) of each step committed and not acknowledged yet (rank 0 only)."""
    event_seq: int = 1
    """The sequence number of events[0]: the supervisor acknowledges what it has taken in, and skips
    what it already has when an item comes again (elastic._internal.worker.status)."""
    record_seq: int = 1
    """The sequence number of records[0]."""
    committed_step: int = -1
    """The newest step a checkpoint this worker took part in committed (-1: none yet)."""
    restored: Restored | None = None
    """What this worker restored in its latest generation (None before it restored anything)."""

    def __post_init__(self) -> None:
        # Accept the names too (a test's fake group, an older worker): always hold the members.
        object.__setattr__(self, "state", WorkerState(self.state))
        if self.park_reason is not None:
            object.__setattr__(self, "park_reason", ParkReason(self.park_reason))

    @property
    def error(self) -> str | None:
        return self.failure.message if self.failure is not None else None

    @property
    def fatal(self) -> bool:
        return self.failure is not None and self.failure.kind is FailureKind.FATAL


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    node_id: str
    ip: str
    background_startup: bool = False  # its start-up ran at idle CPU priority (elastic._internal.worker.priority)
