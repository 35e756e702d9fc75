"""The last committed state of this rank, kept in host memory.

Taken at every commit so that a survivor can hand the newest state to newcomers without a storage
round trip. Buffers are allocated once and reused while shapes stay the same (a fresh allocation
costs ~4x a copy into a warm buffer).
"""

from __future__ import annotations

from typing import Any

import torch

from elastic.worker.flat_state import flatten, unflatten


class Snapshot:
    def __init__(self) -> None:
        self.step: int = -1
        self._skeleton: Any = None
        self._buffers: list[torch.Tensor] = []

    @property
    def empty(self) -> bool:
        return self.step < 0

    def capture(self, sd: dict[str, Any], step: int) -> None:
        skeleton, tensors = flatten(sd)
        if len(tensors) != len(self._buffers) or any(
            b.shape != t.shape or b.dtype != t.dtype for b, t in zip(self._buffers, tensors)
        ):
            self._buffers = [torch.empty_like(t, device="cpu") for t in tensors]
        with torch.no_grad():
            for buf, t in zip(self._buffers, tensors):
                buf.copy_(t.detach(), non_blocking=False)
        self._skeleton = skeleton
        self.step = step

    def state_dict(self) -> dict[str, Any]:
        """A dict that reads from the snapshot's buffers (loaders copy out of it)."""
        if self.empty:
            raise RuntimeError("no snapshot taken yet")
        return unflatten(self._skeleton, list(self._buffers))

    def flat(self) -> tuple[Any, list[torch.Tensor]]:
        return self._skeleton, self._buffers

    def clear(self) -> None:
        self.step = -1
        self._skeleton = None
