"""Agree on where the newest state is, and send it from the rank that holds it to every other rank.

Used after a rebuild when a survivor's in-memory snapshot is newer than (or as new as) the newest
durable checkpoint: newcomers get it from a peer, with no storage round trip. Everything travels
on the control plane: the agreement as integers, the structure as JSON (paths, shapes, dtypes and
the non-tensor values), all tensors as one byte buffer. Nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from elastic._internal.collectives import Collectives
from elastic._internal.tree import Path
from elastic._internal.worker.snapshot import Snapshot


@dataclass(frozen=True)
class Agreement:
    """What every rank of a new group holds: the step of its in-memory snapshot (-1: none) and the
    newest durable checkpoint any rank saw. All ranks compute the same Agreement."""

    steps: list[int]
    durable: int
    last_committed: int = -1
    """The newest step any surviving rank had committed (snapshot or not): lost work is measured
    against it."""

    @property
    def best(self) -> int:
        return max(self.steps)

    @property
    def source(self) -> int:
        return self.steps.index(self.best)

    @property
    def peers_are_freshest(self) -> bool:
        return self.best >= 0 and self.best >= self.durable


def agree(snapshot_step: int, durable_step: int, ctrl: Collectives, last_committed: int = -1) -> Agreement:
    rows = ctrl.all_gather_ints([snapshot_step, durable_step, last_committed])
    return Agreement(steps=[r[0] for r in rows], durable=max(r[1] for r in rows),
                     last_committed=max(r[2] for r in rows))


def newest_state(snapshot: Snapshot, agreement: Agreement, ctrl: Collectives,
                 like: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(the newest committed state, where it came from) when a peer holds it; collective. A rank
    that received it keeps it as its snapshot."""
    if all(s == agreement.best for s in agreement.steps):
        return snapshot.state_dict(like), "memory"
    broadcast_state(snapshot, agreement.source, ctrl, agreement.best)
    return snapshot.state_dict(like), f"peer:{agreement.source}"


ALIGN = 16
"""Byte alignment of each tensor in a transfer (the largest element size: complex128)."""


def broadcast_state(snapshot: Snapshot, src: int, ctrl: Collectives, step: int) -> None:
    """Send `src`'s snapshot to every rank; the others' snapshots become copies of it."""
    snapshot.wait()
    header = None
    if ctrl.rank == src:
        header = {"step": snapshot.step,
                  "tensors": [[list(p), list(t.shape), str(t.dtype).removeprefix("torch.")] for p, t in snapshot.tensors],
                  "values": [[list(p), v] for p, v in snapshot.values]}
    header = ctrl.broadcast_json(header, src)
    metas = [(tuple(p), tuple(shape), _dtype(d)) for p, shape, d in header["tensors"]]
    sizes = [torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size() for _, shape, dt in metas]
    # Each tensor starts at a multiple of ALIGN bytes: a receiver views its bytes as the dtype,
    # which needs an aligned offset (a bfloat16 tensor of odd length before a float one had none).
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + -(-size // ALIGN) * ALIGN)
    payload = torch.empty(offsets[-1], dtype=torch.uint8)  # padding bytes are sent, never read
    if ctrl.rank == src:
        for (_, t), at, size in zip(snapshot.tensors, offsets, sizes):
            payload[at: at + size].copy_(t.contiguous().reshape(-1).view(torch.uint8))
    ctrl.broadcast_(payload, src)
    if ctrl.rank == src:
        return
    tensors: list[tuple[Path, torch.Tensor]] = []
    for (path, shape, dt), at, size in zip(metas, offsets, sizes):
        tensors.append((path, payload[at: at + size].view(dt).reshape(shape)))
    snapshot.load(tensors, [(tuple(p), v) for p, v in header["values"]], int(header["step"]))


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"a peer sent an unknown dtype {name!r}")
    return dt
