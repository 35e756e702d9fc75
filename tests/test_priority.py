"""A background worker's start-up runs at SCHED_IDLE, every thread comes back to normal, and what
it relies on: loading the actor class imports no torch."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from elastic._internal.waiting import wait_until
from elastic._internal.worker.priority import background_priority, can_restore, idle_unless, normal

pytestmark = pytest.mark.timeout(60)
needs_restore = pytest.mark.skipif(not can_restore(), reason="this process may not leave SCHED_IDLE (RLIMIT_NICE)")


def test_the_actor_module_and_the_package_import_no_torch():
    # The worker actor lowers its priority before importing torch: that only helps if loading the
    # actor class (and `import elastic`) does not import torch already. Every exported name resolves.
    code = ("import sys, elastic, elastic._internal.worker.actor; assert 'torch' not in sys.modules, 'torch imported'; "
            "[getattr(elastic, n) for n in elastic.__all__]; assert 'torch' in sys.modules")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert p.returncode == 0, p.stderr[-2000:]


@needs_restore
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


@needs_restore
def test_idle_priority_ends_after_the_cap_even_while_the_block_runs():
    helper_ready = threading.Event()
    stop = threading.Event()
    t = threading.Thread(target=lambda: (helper_ready.set(), stop.wait(10)))
    with background_priority(True, max_idle_s=0.3) as lowered:
        assert lowered and os.sched_getscheduler(0) == os.SCHED_IDLE
        t.start()
        assert helper_ready.wait(10)
        wait_until(lambda: os.sched_getscheduler(0) == os.SCHED_OTHER, timeout_s=10, interval_s=0.02)
        # Back to normal inside the block, for the thread it started too.
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
        assert os.sched_getscheduler(t.native_id) == os.SCHED_OTHER
    stop.set()
    t.join(10)


@needs_restore
def test_idle_unless_runs_the_block_idle_and_a_stop_from_another_thread_raises_it_at_once():
    stop = threading.Event()
    seen: dict[str, object] = {}
    lowered_in_block = threading.Event()

    def block_thread() -> None:  # like the generation thread prefaulting
        with idle_unless(stop) as go:
            seen["go"], seen["in_block"] = go, os.sched_getscheduler(0)
            seen["tid"] = threading.get_native_id()
            lowered_in_block.set()
            wait_until(stop.is_set, timeout_s=10, interval_s=0.01)
            seen["after_stop"] = os.sched_getscheduler(0)
        seen["after"] = os.sched_getscheduler(0)

    t = threading.Thread(target=block_thread)
    t.start()
    assert lowered_in_block.wait(10)
    normal(seen["tid"])  # what WorkerRuntime.start does (it sets the stop first: either order ends normal)
    stop.set()
    t.join(10)
    assert seen == {"go": True, "in_block": os.SCHED_IDLE, "tid": seen["tid"], "after_stop": os.SCHED_OTHER,
                    "after": os.SCHED_OTHER}
    # Stopped before it began: the block is told not to go on, and the thread ends at normal priority.
    with idle_unless(stop) as go:
        assert not go
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
