"""What the policy can decide: one small frozen class per decision.

The policy (policy.py) returns these from what the workers answered, the failure budget and the
clock; the controller (controller.py) carries them out and decides nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    room for more workers (`grow`)."""

    reason: str
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
