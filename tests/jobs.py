"""Training functions used by the integration tests: the reference job, and a variant whose
checkpoints do not fit it."""

from __future__ import annotations

import ctypes
import os
import resource

from elastic.chaos.job import IN_DIM, N_SAMPLES, make_data, make_model, train  # noqa: F401


def train_other_model(config: dict) -> None:
    """Same loop, different layer sizes: its checkpoints must not load into `train`'s model."""
    train({**config, "width": 8})


def faults_per_round(rounds: int = 2, blocks: int = 40) -> list[int]:
    """Page faults of the calling thread for each round of allocating `blocks` blocks of 4 MB (below
    the mmap threshold), writing them and freeing them again."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    faults = []
    for _ in range(rounds):
        f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        ptrs = [libc.malloc(4 << 20) for _ in range(blocks)]
        for p in ptrs:
            ctypes.memset(p, 1, 4 << 20)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)
        for p in ptrs:
            libc.free(p)
    return faults


def train_noting_heap(config: dict) -> None:
    """Same loop; first, on the training thread, allocates 160 MB, frees it and allocates it again,
    and notes the second round's page faults in the file `config["faults_file"]`."""
    with open(config["faults_file"], "w") as f:
        f.write(str(faults_per_round()[1]))
    train(config)
