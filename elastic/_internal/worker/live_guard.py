"""Whether a live snapshot still holds the step it captured.

A live capture (FailureConfig.live_snapshots, CPU, replicated state) keeps references to the live
parameters and optimizer state, which are the committed step's until the next optimizer.step().
Each tensor's version counter (bumped by every in-place change made through the tensor itself,
which is how torch's optimizers update) says whether that still holds. Changes the counters cannot
see (through `.data`, a numpy view, an optimizer that updates `p.data`) are caught, when they touch a
sampled element, by a sampled checksum (SAMPLES bytes-exact elements per tensor, taken at each live
capture): at the next live capture (a tensor whose version did not move but whose samples did) and
whenever the state is used. Either way a one-line error is logged and `violation` is set: live
captures are off for good in this process.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from elastic._internal.tree import Path

log = logging.getLogger("elastic._internal.worker.snapshot")  # the snapshot's errors, under its name as before

SAMPLES = 16
"""Elements per stable tensor in a live snapshot's checksum, evenly strided (compared as bytes)."""


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _Sampler:
    """SAMPLES evenly strided elements of each tensor, read as integers of the same size (bitwise:
    a NaN equals itself), grouped by size so that one torch.cat per size reads them all. The views
    are built once per set of tensors; every take() reads their current values. Empty and
    non-contiguous tensors are not sampled."""

    def __init__(self, tensors: list[tuple[Path, torch.Tensor]]) -> None:
        self.paths = [p for p, _ in tensors]
        views: dict[int, list[torch.Tensor]] = {}
        owners: dict[int, list[int]] = {}
        for i, (_, t) in enumerate(tensors):
            n = t.numel()
            if n == 0 or not t.is_contiguous():
                continue
            width = max(1, t.element_size() // 8)  # complex128: two int64 per element
            rows = t.reshape(-1).view(_INT_OF_SIZE[t.element_size() // width]).view(n, width)
            k = min(SAMPLES, n)
            views.setdefault(t.element_size(), []).append(rows[:: n // k][:k])
            owners.setdefault(t.element_size(), []).extend([i] * (k * width))
        self._views = list(views.values())
        self._owners = [torch.tensor(owners[size]) for size in views]

    def take(self) -> list[torch.Tensor]:
        return [torch.cat(v).reshape(-1) for v in self._views]

    def first_moved(self, before: list[torch.Tensor], now: list[torch.Tensor] | None = None,
                    among: torch.Tensor | None = None) -> int | None:
        """The first tensor (among `among`, a bool per tensor; all by default) whose samples differ
        between `before` and `now` (the current values by default); None when none does."""
        now = self.take() if now is None else now
        for b, a, owner in zip(before, now, self._owners):
            differs = a != b
            if among is not None:
                differs &= among.index_select(0, owner)
            if bool(differs.any()):
                return int(owner[differs.nonzero()[0, 0]])
        return None


def _same_tensors(old: list[tuple[Path, torch.Tensor]], new: list[tuple[Path, torch.Tensor]]) -> bool:
    """The same list (a capture plan's fast path), or one naming the same storage in the same order
    (its slow path walks the state dict again and gets new tensor objects over the same memory)."""
    return old is new or (len(old) == len(new) and all(
        po == pn and to.data_ptr() == tn.data_ptr() and to.shape == tn.shape and to.dtype == tn.dtype
        for (po, to), (pn, tn) in zip(old, new)))


class LiveGuard:
    """The references a live snapshot keeps of the stable tensors, their versions and samples at
    the capture, and the checks against them."""

    def __init__(self) -> None:
        self.violation: str | None = None
        """Set when a live tensor changed without its version counter moving."""
        self._versions: list[tuple[torch.Tensor, int]] = []
        self._samples: list[torch.Tensor] | None = None
        self._refs: tuple[list, dict[Path, torch.Tensor], _Sampler] | None = None

    @property
    def refs(self) -> dict[Path, torch.Tensor]:
        """The stable tensors' references taken at the last sound() (what a live snapshot holds)."""
        assert self._refs is not None
        return self._refs[1]

    def sound(self, stable: list[tuple[Path, torch.Tensor]], step: int) -> bool:
        """Before a live capture: take its version counters and samples. False (a copy is taken
        instead) once a violation was seen, or when a tensor whose version did not move since the
        previous live capture of the same tensors (of `step`) holds other values."""
        if self.violation is not None:
            return False
        if self._refs is None or not _same_tensors(self._refs[0], stable):
            # The same tensors as last time: the same references (detach() shares the version
            # counter, so a cached one sees every change of its tensor) and the same sample views.
            refs = {p: t.detach() for p, t in stable}
            self._refs = (stable, refs, _Sampler(list(refs.items())))
            self.forget()
        _, refs, sampler = self._refs
        samples = sampler.take()
        if self._samples is not None and self._versions:
            # Normally optimizer.step() moved every version; a tensor it did not move (a frozen
            # parameter; an optimizer that updates p.data) must hold the values it held then.
            still = [t._version == v for t, v in self._versions]
            if any(still):
                among = torch.from_numpy(np.fromiter(still, dtype=bool, count=len(still)))
                i = sampler.first_moved(self._samples, samples, among=among)
                if i is not None:
                    self._violate(sampler.paths[i], "since the previous commit", step)
                    return False
        self._versions = [(t, t._version) for t in refs.values()]
        self._samples = samples
        return True

    def intact(self, step: int) -> bool:
        """The live tensors still hold the captured step: no version moved, no sample changed."""
        if self.violation is not None or self._refs is None or self._samples is None:
            return False
        if any(t._version != v for t, v in self._versions):
            return False
        sampler = self._refs[2]
        i = sampler.first_moved(self._samples)
        if i is not None:
            self._violate(sampler.paths[i], f"since the commit of step {step}", step)
            return False
        return True

    def require(self, step: int, *, live: bool) -> None:
        """A live snapshot is read only while it holds its step (loud, never silently wrong)."""
        if live and not self.intact(step):
            raise RuntimeError(f"the live snapshot of step {step} no longer holds it: "
                               f"{self.violation or 'its tensors changed since the commit'}")

    def forget(self) -> None:
        """No live capture to check (a copy was taken, or a state loaded)."""
        self._versions, self._samples = [], None

    def reset(self) -> None:
        """Forget the references too (the snapshot was cleared)."""
        self.forget()
        self._refs = None

    def _violate(self, path: Path, when: str, step: int) -> None:
        self.violation = (f"{'.'.join(map(str, path))} changed {when} without its version counter moving "
                          "(an in-place change through .data, a numpy view, or an optimizer that updates p.data)")
        log.error("live snapshot of step %d not used: %s; snapshots are copied from now on", step, self.violation)
