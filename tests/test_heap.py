"""A worker's freed host memory stays resident for its next allocations (heap.py): only in glibc's
main arena, hence MALLOC_ARENA_MAX=1 in every worker; and a standby's heap prefault gives way at once."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from elastic._internal.worker import heap

pytestmark = pytest.mark.timeout(60)

ROUNDS = f"""
import sys, threading
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from elastic._internal.worker import heap
from jobs import faults_per_round
heap.keep_freed_memory()
out = []
def rounds():  # like the generation thread: a thread of its own
    if sys.argv[1] == "prefault":
        heap.prefault(256 << 20, lambda: True)
    out.extend(faults_per_round())
t = threading.Thread(target=rounds)
t.start()
t.join()
print(*out)
"""


def _faults(arena_max: str | None, mode: str = "plain") -> list[int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if arena_max:
        env["MALLOC_ARENA_MAX"] = arena_max
    p = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=50, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return [int(x) for x in p.stdout.split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="not glibc")
def test_a_thread_gets_its_freed_memory_back_without_faults_only_in_the_main_arena():
    # 160 MB = 40 k pages, allocated, freed and allocated again by one thread.
    first, second = _faults(heap.ARENA_ENV["MALLOC_ARENA_MAX"])
    assert first > 30_000 and second < 1_000
    # In a thread arena of its own, heaps freed whole go back to the kernel whatever the threshold.
    _, second_own_arena = _faults(None)
    assert second_own_arena > 10_000
    # A prefault makes even the first round resident.
    first, _ = _faults(heap.ARENA_ENV["MALLOC_ARENA_MAX"], "prefault")
    assert first < 1_000


def test_a_prefault_stops_at_the_next_chunk_once_asked():
    looks = iter([True, True, False])  # an assignment arriving while the second chunk is faulted in
    assert heap.prefault(64 << 30, lambda: next(looks)) == 2 * heap.PREFAULT_CHUNK  # not the 64 GiB asked for
    assert heap.prefault(64 << 30, lambda: False) == 0
