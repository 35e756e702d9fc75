"""`ctx.data_loader(...)`: a standard torch DataLoader over the user's map-style Dataset whose
batch sampler is elastic's (elastic.sampler.ElasticBatchSampler), started at the restored step.

What elastic adds to a plain DataLoader:
- the batch of step s is the same set of samples at any world size, so a loader rebuilt in a new
  generation (the training function runs again after every rebuild) continues at the exact sample;
- its worker processes die with their rank (PR_SET_PDEATHSIG): a rank killed by SIGKILL leaves no
  loader process behind, not even for the few seconds torch's own watchdog would take;
- the loader's seed for its workers comes from (seed, start step), never from the global RNG, so
  building a loader does not change the random draws of the step it starts at (elastic reseeds the
  global RNG per step for exact equality).
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from elastic.errors import ConfigError
from elastic.sampler import ElasticBatchSampler, ElasticSampler

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere). `parent`: the pid
    the parent had; if it died before the request (a loader worker still starting when its rank was
    killed), nothing would ever signal this process, so it goes now."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


class _WorkerInit:
    """The loader workers' init: die with the rank, then the user's own init (picklable, so that
    it works with the spawn and forkserver start methods too)."""

    def __init__(self, user: Callable[[int], Any] | None):
        self.user = user
        self.parent = os.getpid()  # built in the rank's process, which starts the loader workers

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent)
        if self.user is not None:
            self.user(worker_id)


def make_loader(dataset: Any, *, global_batch_size: int, start_step: int, rank: int, world_size: int,
                seed: int = 0, steps: int | None = None, drop_last: bool = True, **kw: Any) -> DataLoader:
    for bad in ("batch_size", "shuffle", "sampler", "batch_sampler"):
        if bad in kw:
            raise ConfigError(f"data_loader: {bad}= is elastic's to choose (the global batch of each step is fixed "
                              f"at any world size): pass global_batch_size= and seed= instead")
    try:
        n = len(dataset)
    except TypeError:
        raise ConfigError("data_loader needs a map-style dataset (with __len__ and __getitem__)") from None
    sampler = ElasticSampler(num_samples=n, global_batch_size=global_batch_size, seed=seed, drop_last=drop_last)
    batches = ElasticBatchSampler(sampler, start_step=start_step, rank=rank, world_size=world_size, steps=steps)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + start_step)
    return DataLoader(dataset, batch_sampler=batches, generator=gen,
                      worker_init_fn=_WorkerInit(kw.pop("worker_init_fn", None)), **kw)
