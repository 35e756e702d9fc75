"""Send the newest committed state from one rank to every other rank over the process group.

Used after a rebuild when a survivor's in-memory snapshot is newer than (or as new as) the newest
durable checkpoint: newcomers get it from a peer, with no storage round trip. All tensors travel as
one byte buffer (one collective, any dtype), the structure as one pickled object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from elastic.worker.flat_state import slots, unflatten
from elastic.worker.snapshot import Snapshot


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


def agree(snapshot_step: int, durable_step: int, pg: dist.ProcessGroup, device: torch.device,
          last_committed: int = -1) -> Agreement:
    world = dist.get_world_size(pg)
    mine = torch.tensor([snapshot_step, durable_step, last_committed], dtype=torch.int64, device=device)
    gathered = [torch.zeros(3, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(gathered, mine, group=pg)
    return Agreement(steps=[int(t[0]) for t in gathered], durable=max(int(t[1]) for t in gathered),
                     last_committed=max(int(t[2]) for t in gathered))


def newest_state(snapshot: Snapshot, agreement: Agreement, pg: dist.ProcessGroup,
                 device: torch.device) -> tuple[dict[str, Any], str]:
    """(the newest committed state, where it came from) when a peer holds it; collective."""
    if all(s == agreement.best for s in agreement.steps):
        return snapshot.state_dict(), "memory"
    sd = broadcast_state(snapshot, agreement.source, pg, device)
    return sd, f"peer:{agreement.source}"


def broadcast_state(snapshot: Snapshot, src: int, pg: dist.ProcessGroup, device: torch.device) -> dict[str, Any]:
    rank = dist.get_rank(pg)
    holder: list[Any] = [snapshot.flat()[0] if rank == src else None]
    dist.broadcast_object_list(holder, src=src, group=pg, device=device if device.type == "cuda" else None)
    skeleton = holder[0]
    metas = slots(skeleton)
    sizes = [int(torch.Size(m.shape).numel()) * torch.empty((), dtype=m.dtype).element_size() for m in metas]
    if rank == src:
        _, tensors = snapshot.flat()
        payload = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]) if tensors else torch.empty(0, dtype=torch.uint8)
    else:
        payload = torch.empty(sum(sizes), dtype=torch.uint8)
    payload = payload.to(device)
    dist.broadcast(payload, src=src, group=pg)
    payload = payload.cpu()
    out: list[torch.Tensor] = []
    offset = 0
    for meta, size in zip(metas, sizes):
        out.append(payload[offset : offset + size].view(meta.dtype).reshape(meta.shape))
        offset += size
    return unflatten(skeleton, out)
