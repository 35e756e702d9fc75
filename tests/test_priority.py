"""A background worker's start-up runs at SCHED_IDLE, every thread comes back to normal, and what
it relies on: loading the actor class imports no torch."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from elastic._internal.waiting import wait_until
from elastic._internal.worker.heap import prefault
from elastic._internal.worker.priority import background_priority, can_restore, lowered, normal

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


ASKED = 8 << 30  # seconds of page faults: far more than a test lets it finish


@needs_restore
def test_a_standby_prefault_runs_idle_and_ends_when_raised_by_the_cap_or_by_an_assignment():
    # The cap: raised by the timer, the prefault stops at its next chunk (seconds' worth asked for).
    with background_priority(True, max_idle_s=0.3) as low:
        assert low and lowered()
        got = prefault(ASKED, lowered)
    assert 0 < got < ASKED and not lowered()
    # An assignment (WorkerRuntime.start): normal() on the thread from another one ends it too.
    done: list[int] = []
    running = threading.Event()

    def go() -> bool:  # `running` once a chunk is sure to be faulted in: normal() may come at once
        idle = lowered()
        if idle:
            running.set()
        return idle

    def gen_thread() -> None:
        with background_priority(True, max_idle_s=30) as low:
            assert low
            done.append(threading.get_native_id())
            done.append(prefault(ASKED, go))

    t = threading.Thread(target=gen_thread)
    t.start()
    assert running.wait(10)
    normal(done[0])
    t.join(20)
    assert not t.is_alive() and 0 < done[1] < ASKED


@needs_restore
def test_a_rehearsal_goes_before_the_standby_prefault_which_goes_on_after_it(monkeypatch, tmp_path):
    """A standby's prefault can take its 10 s at idle priority; a rehearsal asked for meanwhile
    (0.1-0.3 s, worth 0.4 s of a newcomer's first step) runs at its next chunk, then the prefault again."""
    import time

    from elastic.config import CheckpointConfig, RunConfig
    from elastic._internal.worker import heap, rehearsal
    from elastic._internal.worker.runtime import WorkerRuntime

    order: list[str] = []

    def chunks_until_told(nbytes: int, go) -> int:
        order.append("prefault")
        deadline = time.monotonic() + 20
        while go() and time.monotonic() < deadline:
            time.sleep(0.01)
        order.append("prefault gives way")
        return 0

    monkeypatch.setattr(heap, "prefault", chunks_until_told)
    # The rehearsal reports the bytes of a rank's buddy slot: the standby stocks two blanks of it.
    monkeypatch.setattr(rehearsal, "rehearse", lambda layout: order.append(f"rehearsal {layout}") or 1 << 16)
    # Recorded, not run: gc.freeze here would freeze the test process's objects for the rest of the suite.
    monkeypatch.setattr(heap, "freeze_objects", lambda: order.append("freeze"))
    rt = WorkerRuntime(lambda config: None, RunConfig(checkpoint=CheckpointConfig(uri=str(tmp_path))))
    rt.fault_in_heap(1 << 30)
    assert wait_until(lambda: order == ["prefault"], timeout_s=10)
    rt.rehearse({"n": 1})
    assert wait_until(lambda: len(order) == 5, timeout_s=10), order
    assert order == ["prefault", "prefault gives way", "rehearsal {'n': 1}", "freeze", "prefault"] and rt.s.rehearsed
    assert rt.s.buddy.slots.blank_bytes == 2 << 16 or not can_restore()  # made at idle priority only
    rt._prefault_stop.set()  # an assignment: the prefault gives way for good
    assert wait_until(lambda: order[-1] == "prefault gives way", timeout_s=10)
    rt.s.buddy.slots.stock(0)  # the blanks' memfds go with the test
