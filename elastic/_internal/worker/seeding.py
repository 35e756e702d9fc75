"""Random state as a pure function of (seed, step, rank).

Re-seeding at every step boundary makes dropout masks and other random draws independent of
failures, resumes and resizes: a replacement rank draws exactly what the rank it replaces would have.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def mix(seed: int, step: int, rank: int) -> int:
    # splitmix64-style mixing: nearby (step, rank) pairs get unrelated seeds.
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    return x & (2**63 - 1)


def reseed(seed: int, step: int, rank: int) -> None:
    s = mix(seed, step, rank)
    # The generators themselves, not torch.manual_seed: that one also queues a lazy CUDA seeding
    # that records the caller's stack (about 2 ms per call inside a worker, at every step).
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for gen in torch.cuda.default_generators:
            gen.manual_seed(s)
    random.seed(s)
    np.random.seed(s & (2**32 - 1))
