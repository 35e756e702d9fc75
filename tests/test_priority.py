"""Unit: a background worker's start-up runs at SCHED_IDLE and every thread comes back to normal."""

from __future__ import annotations

import os
import threading

import pytest

from elastic.worker.priority import background_priority, can_restore

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(not can_restore(), reason="this process may not leave SCHED_IDLE (RLIMIT_NICE)")]


def test_block_runs_idle_and_every_thread_it_started_comes_back():
    started = threading.Event()
    stop = threading.Event()
    seen: dict[str, int] = {}

    def pool_thread() -> None:  # like a torch or gloo thread created during the warm-up
        seen["thread_at_start"] = os.sched_getscheduler(0)
        started.set()
        stop.wait(10)
        seen["thread_after"] = os.sched_getscheduler(0)

    with background_priority(True) as lowered:
        assert lowered and os.sched_getscheduler(0) == os.SCHED_IDLE
        t = threading.Thread(target=pool_thread)
        t.start()
        assert started.wait(10)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    stop.set()
    t.join(10)
    assert seen == {"thread_at_start": os.SCHED_IDLE, "thread_after": os.SCHED_OTHER}


def test_disabled_leaves_priority_alone():
    with background_priority(False) as lowered:
        assert not lowered and os.sched_getscheduler(0) == os.SCHED_OTHER
