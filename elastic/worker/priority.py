"""Idle CPU priority for a worker's start-up, when it would compete with training ranks.

SCHED_IDLE (not nice): a process may raise its nice value but not lower it again without
privilege, while leaving SCHED_IDLE is allowed wherever RLIMIT_NICE permits nice 0 (root, or a
raised limit). Where it is not allowed the start-up simply runs at normal priority.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

log = logging.getLogger(__name__)


def can_restore() -> bool:
    if not hasattr(os, "SCHED_IDLE"):
        return False
    if os.geteuid() == 0:
        return True
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20  # nice 0 is allowed iff 20 - 0 <= soft


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _set_all(policy: int) -> None:
    # Policies are per thread and new threads inherit their creator's: every thread the block
    # started (torch's pools, gloo's) must come back too, not only this one.
    for tid in _threads():
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except (ProcessLookupError, PermissionError):
            pass


@contextlib.contextmanager
def background_priority(enabled: bool) -> Iterator[bool]:
    """Run the block at SCHED_IDLE when `enabled` and the process can return to normal afterwards;
    yields whether it did."""
    if not enabled or not can_restore():
        yield False
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        _set_all(os.SCHED_OTHER)
