"""Idle CPU priority for a worker's start-up, when it would compete with training ranks.

SCHED_IDLE (not nice): a process may raise its nice value but not lower it again without
privilege, while leaving SCHED_IDLE is allowed wherever RLIMIT_NICE permits nice 0 (root, or a
raised limit). Where it is not allowed the start-up simply runs at normal priority.

Bounded: on cores the training ranks keep fully busy an idle-priority start-up gets no CPU at all,
and a spare that never becomes ready cannot take the next failure. After MAX_IDLE_S the start-up
goes on at normal priority, so it defers the competition for at most that long.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

MAX_IDLE_S = 5.0
PREFAULT_IDLE_S = 10.0
"""The bound on a standby's heap prefault (runtime.WorkerRuntime.fault_in_heap): a thread at
SCHED_IDLE preempted inside malloc holds the process's one arena lock (heap.ARENA_ENV) from its other
threads until it runs again; past this the timer raises it, and the prefault ends at its next chunk."""


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
def background_priority(enabled: bool, *, max_idle_s: float = MAX_IDLE_S) -> Iterator[bool]:
    """Run the block at SCHED_IDLE (for at most `max_idle_s`) when `enabled` and the process can
    return to normal afterwards; yields whether it lowered the priority."""
    if not enabled or not can_restore():
        yield False
        return
    block_done = threading.Event()

    def restore_when_due() -> None:
        if not block_done.wait(max_idle_s):
            _set_all(os.SCHED_OTHER)

    # Started before lowering: this thread keeps normal priority, so it runs on time however busy
    # the cores are.
    timer = threading.Thread(target=restore_when_due, name="elastic-idle-cap", daemon=True)
    timer.start()
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        block_done.set()
        timer.join()
        yield False
        return
    try:
        yield True
    finally:
        block_done.set()
        timer.join()
        _set_all(os.SCHED_OTHER)


def normal(tid: int) -> None:
    """Thread `tid` (0: this one) back at SCHED_OTHER, if it may and it is not already."""
    if hasattr(os, "SCHED_IDLE") and can_restore():
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass


def lowered() -> bool:
    """Whether this thread runs at SCHED_IDLE."""
    return hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE
