"""Send the newest committed state from one rank to every other rank over the process group.

Used after a rebuild when a survivor's in-memory snapshot is newer than (or as new as) the newest
durable checkpoint: newcomers get it from a peer, with no storage round trip. All tensors travel as
one byte buffer (one collective, any dtype), the structure as one pickled object.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from elastic.worker.flat_state import slots, unflatten
from elastic.worker.snapshot import Snapshot


def agree_on_source(local_step: int, pg: dist.ProcessGroup, device: torch.device) -> tuple[int, int, list[int]]:
    """(newest step any rank holds, the lowest rank holding it, every rank's step)."""
    world = dist.get_world_size(pg)
    mine = torch.tensor([local_step], dtype=torch.int64, device=device)
    gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(gathered, mine, group=pg)
    steps = [int(t.item()) for t in gathered]
    best = max(steps)
    return best, steps.index(best), steps


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
