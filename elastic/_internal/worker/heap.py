"""Keeping the host memory a worker frees for its own reuse (glibc malloc), instead of handing it
back to the kernel and faulting it in again.

By default glibc returns the top of a heap to the kernel once more than its trim threshold (at most
64 MiB, adjusted as it goes) is free. A recovery frees a whole model and optimizer and allocates
them again a moment later, and the first step after it allocates every gradient and gathered
parameter: each page handed back comes back as a page fault on the critical path of the recovery
(measured at 2 ranks, 25 M parameters: a survivor's first step and commit after a restore took
168 k minor faults by default, 108 k with the thresholds fixed, against 3-20 k in a steady step).
Fixing the thresholds (which also turns off glibc's adjusting) keeps freed memory in the process,
as PyTorch's CUDA caching allocator keeps device memory: a worker's resident memory stays at its
peak, which a training process reaches again at every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt's parameter numbers (malloc.h)."""
MMAP_THRESHOLD_BYTES = 32 << 20
"""Allocations above this still get pages of their own, returned when freed (glibc's own upper
bound for the threshold it adjusts)."""
TRIM_THRESHOLD_BYTES = (1 << 31) - 1
"""The largest value mallopt takes (an int): the heap's free top is never handed back."""


ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}
"""In a worker's environment (glibc reads it as the process starts): every thread allocates from the
main arena. The thresholds below hold there only: a thread arena frees a whole heap (64 MiB) back to
the kernel as soon as all of it is free, whatever the trim threshold, so the generation thread's
freed memory came back as page faults (measured: 160 MB freed and allocated again in a thread, 26-29 k
faults per round in a thread arena, 0 in the main arena). Training threads allocate one at a time,
so the shared arena's lock is not contended."""


def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds for this process; False where libc is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, macOS: their allocators keep their own policies
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


PREFAULT_BYTES = 1 << 30
"""How much heap a standby faults in while it waits (a 25 M-parameter FSDP2 rank's first step after
a restore faulted in about 110 k pages, 450 MB, in a fresh process). Kept only in the main arena
(ARENA_ENV)."""
PREFAULT_CHUNK = 16 << 20
"""Below MMAP_THRESHOLD_BYTES: the chunks come from the heap, not pages of their own."""


def prefault(nbytes: int, go: Callable[[], bool]) -> int:
    """Fault in up to `nbytes` of the process's heap and free it again, so that the next allocations
    find resident pages (kept after keep_freed_memory, in the main arena); ends at the first chunk
    for which `go()` is false. Returns the bytes faulted in. ctypes drops the GIL during each call."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return 0
    malloc, free = libc.malloc, libc.free
    malloc.restype, malloc.argtypes, free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    chunks: list[int] = []
    try:
        while len(chunks) * PREFAULT_CHUNK < nbytes and go():
            ptr = malloc(PREFAULT_CHUNK)
            if not ptr:
                break
            chunks.append(ptr)
            ctypes.memset(ptr, 0, PREFAULT_CHUNK)
    finally:
        for ptr in chunks:
            free(ptr)
    return len(chunks) * PREFAULT_CHUNK


def freeze_objects() -> None:
    """Collect the garbage there is, then exempt every object alive from later collections
    (gc.freeze): a worker's start-up objects (modules, torch's, a standby's rehearsal) live as long
    as the process does. Walked by a full collection, they cost 0.17 s of CPU that fell into a
    promoted standby's first commit after a 2-rank recovery here, while its buddy waited. Objects
    made later (a generation's model, optimizer) are collected as before."""
    gc.collect()
    gc.freeze()
