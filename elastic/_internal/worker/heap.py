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

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt's parameter numbers (malloc.h)."""
MMAP_THRESHOLD_BYTES = 32 << 20
"""Allocations above this still get pages of their own, returned when freed (glibc's own upper
bound for the threshold it adjusts)."""
TRIM_THRESHOLD_BYTES = (1 << 31) - 1
"""The largest value mallopt takes (an int): the heap's free top is never handed back."""


def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds for this process; False where libc is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, macOS: their allocators keep their own policies
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
