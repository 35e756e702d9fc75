"""What the policy can decide (one small frozen class per decision) and what a policy must answer
(the Policy protocol).

The policy (policy.py) returns these from what the workers answered, the failure budget and the
clock; the controller (controller.py) carries them out and decides nothing itself. Nothing of
elastic is imported here at run time, so that config.py can type RunConfig.policy with Policy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Mapping, Protocol

if TYPE_CHECKING:
    from elastic.config import RunConfig
    from elastic._internal.protocol import ErrorSignature
    from elastic._internal.supervisor.policy import Health, MembershipView, QuiesceView, RunningView, StartView


class ResizeReason(str, enum.Enum):
    """Why a group is rebuilt without counting a failure; events and logs carry the value."""

    GROW = "grow"  # ready workers beyond the group, and room for them below max_workers
    PREEMPTION = "preemption"  # ranks leave after a preemption notice (a draining node, SIGTERM)
    SPREAD = "spread"  # a rank promoted onto another rank's node hands over to a newcomer with a node slot

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Continue:
    """Keep training; poll again after poll_interval_s."""


@dataclass(frozen=True)
class Finish:
    """Every rank finished and committed the final state."""


@dataclass(frozen=True)
class Fail:
    """End the run. `final_save`: the survivors first commit the newest state they hold.
    `{resources}` in `error` is replaced by the cluster's free resources when the run reports it."""

    error: str
    exit_code: int
    final_save: bool = False


@dataclass(frozen=True)
class Restart:
    """The group broke (a worker died, froze, hung or raised): rebuild it; counts as a failure."""

    reason: str
    lost: tuple[int, ...]


@dataclass(frozen=True)
class Resize:
    """Rebuild the group without counting a failure: ranks leaving after a preemption notice, or
    room for more workers."""

    reason: ResizeReason
    leaving: tuple[int, ...] = ()


@dataclass(frozen=True)
class Retry:
    """After a failure with budget left: wait `backoff_s`, then rebuild."""

    backoff_s: float


@dataclass(frozen=True)
class Build:
    """Form the next generation with the members at hand (the controller picks them in order:
    survivors first, then ready newcomers, up to max_workers)."""

    replacement_later: bool = False
    """The world size is below max_workers on purpose (replacement="continue"): ask for the missing
    workers in the background; they join through a later grow."""


@dataclass(frozen=True)
class WaitForWorkers:
    """Not enough workers yet: ask for the missing ones (at full priority) and look again."""

    below_min: bool = False
    """Fewer than min_workers: the run says so (waiting_for_workers) and waits, bounded."""


@dataclass(frozen=True)
class Remove:
    """Take these workers out (killed, counted as lost) while the group is being quiesced."""

    workers: tuple[int, ...]
    label: str


Decision = Continue | Finish | Fail | Restart | Resize | Retry | Build | WaitForWorkers | Remove


class Policy(Protocol):
    """What the controller asks its policy (elastic's is policy.DefaultPolicy; RunConfig.policy
    swaps it). Each method decides from what it is shown (the run's config, a view of the
    controller's bookkeeping, the workers' health): none may touch an actor, sleep or read a
    clock, so that every branch is unit-testable with made-up values."""

    @property
    def assignment_slack_s(self) -> float:
        """A worker must accept its assignment within poll_timeout_s + this, or it is lost."""
        ...

    @property
    def drain_check_interval_s(self) -> float:
        """How often the controller asks which nodes are draining."""
        ...

    @property
    def standby_after_s(self) -> float:
        """Standbys start once the first group has stepped and trained this long."""
        ...

    @property
    def standby_rate_window_s(self) -> float:
        """The window over which failures are counted for standbys_per_node."""
        ...

    @property
    def last_words_s(self) -> float:
        """How long a failing run waits for its other members' last answers."""
        ...

    def start(self, run: RunConfig, v: StartView) -> Build | WaitForWorkers | Fail:
        """The run's first group: build it, wait for workers, or give up."""
        ...

    def running(self, run: RunConfig, h: Health, v: RunningView) -> Continue | Finish | Fail | Restart | Resize:
        """A running group's health, every poll interval."""
        ...

    def to_request(self, run: RunConfig, have: int, *, standbys_coming: int = 0, waited_s: float = 0.0,
                   startup_s: float | None = None) -> int:
        """Workers to ask for, given those ready or on their way (`standbys_coming`: standbys still
        starting on the nodes of workers just lost, the rebuild having waited `waited_s`; given only
        when there are any)."""
        ...

    def after_failure(self, run: RunConfig, failures: int, consecutive: int, reason: str,
                      repeated: tuple[ErrorSignature | None, ...] = ()) -> Retry | Fail:
        """After a failure: rebuild (after a back-off) or end the run."""
        ...

    def quiesce(self, run: RunConfig, v: QuiesceView) -> Remove | Continue:
        """Who must go while the members leave the old group."""
        ...

    def membership(self, run: RunConfig, v: MembershipView) -> Build | WaitForWorkers | Fail:
        """The next group: build it with the members found so far, wait for more, or give up."""
        ...

    def standbys_to_promote(self, run: RunConfig, *, missing: int, standbys: Mapping[str, int],
                            lost_nodes: list[str], dead_nodes: Collection[str] = ()) -> tuple[int, ...]:
        """Standbys (node id -> worker id) to turn into workers for the next group; `dead_nodes`:
        those of `lost_nodes` Ray reports dead (given only when there are any)."""
        ...

    def rendezvous_timeout_s(self, run: RunConfig, world_size: int) -> float:
        """Bound on a generation's rendezvous."""
        ...

    def standbys_per_node(self, run: RunConfig, *, failures_in_window: int, window_s: float,
                          startup_s: float | None, nodes: int = 1) -> int:
        """How many standbys to keep warm on each node that hosts ranks (`failures_in_window`: the
        run's, over `nodes` nodes; given only when there are several)."""
        ...

    def final_save_timeout(self, run: RunConfig) -> float:
        """Bound on the survivors' final save when a run ends unfinished."""
        ...
