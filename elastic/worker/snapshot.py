"""The last committed state of this rank, kept in host memory.

Taken at commits so that a survivor can hand the newest state to newcomers without a storage round
trip. Tensors are copied into HostBuffers (allocated once, reused); the other leaves (step counts,
learning rates, scheduler state) are kept as JSON values, as the checkpoint's manifest keeps them.
"""

from __future__ import annotations

from typing import Any

import torch

from elastic import tree
from elastic.checkpoint.state import like_template, split_state
from elastic.hostbuf import HostBuffers
from elastic.tree import Path


class Snapshot:
    def __init__(self) -> None:
        self.step: int = -1
        self.values: list[tuple[Path, Any]] = []
        self.tensors: list[tuple[Path, torch.Tensor]] = []
        self._buffers = HostBuffers()

    @property
    def empty(self) -> bool:
        return self.step < 0

    @property
    def nbytes(self) -> int:
        return self._buffers.nbytes

    def capture(self, sd: dict[str, Any], step: int) -> None:
        tensors, values = split_state(sd)
        self.tensors = self._buffers.copy_in(tree.tensor_leaves(tensors))
        self.values = values
        self.step = step

    def load(self, tensors: list[tuple[Path, torch.Tensor]], values: list[tuple[Path, Any]], step: int) -> None:
        """Hold a state received from a peer (its tensors are kept as given)."""
        self.tensors, self.values, self.step = list(tensors), list(values), step

    def state_dict(self, like: dict[str, Any] | None = None) -> dict[str, Any]:
        """A dict that reads from the snapshot's buffers (loaders copy out of it). `like`: a state
        of the same program, whose tuples (Adam's betas) the JSON values get back."""
        if self.empty:
            raise RuntimeError("no snapshot taken yet")
        sd = tree.build([*self.tensors, *self.values])
        return like_template(like, sd) if like is not None else sd

    def clear(self) -> None:
        self.step = -1
        self.values, self.tensors = [], []
        self._buffers.release()
