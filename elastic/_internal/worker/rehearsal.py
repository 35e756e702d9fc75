"""A standby's rehearsal of the job's optimizer step, on DTensors laid out as the job's, before it is
promoted.

DTensor works out each op's sharding once per op, layout and mesh, per thread (a cache of its own
per thread); a newcomer's first optimizer step paid all of it on a recovery's critical path: 0.47-
0.61 s against a survivor's 0.05-0.18 s for 4 ranks of the benchmark's 25 M-parameter LM on 2 cores
(0.16 s against 0.05 s in a quiet process), 70 ops worked out afresh. A standby rehearses that step
on the generation thread, where the newcomer's will run, on torch's "fake" process group (no peers,
no traffic) of the job's world size: a DeviceMesh hashes and compares by its ranks, shape, names and
thread, not by its process group, so the entries the rehearsal leaves are the ones the real step
looks up. Its tensors hold one row each: the cache is keyed by the global shapes a DTensor
declares, not by what it holds, so a rehearsal costs no memory whatever the model's size.

The layout (describe) comes from a rank of the running group: each parameter's global shape,
stride, dtype and placements, the optimizer's class (torch.optim's only: nothing else is imported
on a standby's say-so) and each group's options.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.distributed as dist

from elastic._internal.worker import meshes

_SCALARS = (bool, int, float, str, type(None))


def describe(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """What a standby needs to rehearse `optimizer`'s step on its parameters (DTensors of one mesh,
    sharded or replicated); None when there is nothing to rehearse or it cannot be described."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if optimizer is None or not type(optimizer).__module__.startswith("torch.optim."):
        return None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params or not all(isinstance(p, DTensor) for p in params):
        return None
    mesh = params[0].device_mesh
    groups = []
    for g in optimizer.param_groups:
        options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        if not all(isinstance(v, _SCALARS) or (isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v))
                   for v in options.values()):
            return None  # a tensor lr, a callable: not worth a rehearsal's guess
        described = []
        for p in g["params"]:
            if p.device_mesh != mesh or not all(isinstance(pl, (Shard, Replicate)) for pl in p.placements):
                return None
            described.append([list(p.shape), list(p.stride()), str(p.dtype).removeprefix("torch."),
                              [pl.dim if isinstance(pl, Shard) else None for pl in p.placements]])
        groups.append({"options": options, "params": described})
    return {"mesh": {"ranks": mesh.mesh.tolist(), "names": list(mesh.mesh_dim_names or [])},
            "device": mesh.device_type, "optimizer": f"{type(optimizer).__module__}:{type(optimizer).__qualname__}",
            "groups": groups}


def rehearse(layout: dict[str, Any], steps: int = 2) -> int | None:
    """Run `steps` optimizer steps of `layout` on a fake process group, on this thread; None when it
    did not run (where a process group is up: a generation's, or a test's), else the bytes a rank
    of this layout writes into a buddy slot (row_bytes)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    module, _, name = layout["optimizer"].partition(":")
    if dist.is_initialized() or not module.startswith("torch.optim.") or layout["device"] != "cpu":
        return None
    cls = getattr(importlib.import_module(module), name)
    ranks = torch.tensor(layout["mesh"]["ranks"])
    importlib.import_module("torch.testing._internal.distributed.fake_pg")  # registers the "fake" backend

    dist.init_process_group("fake", rank=0, world_size=ranks.numel(), store=dist.HashStore())
    try:
        # This thread's object for the mesh (meshes.py): the entries the rehearsal leaves in DTensor's
        # cache point at it, and the generation's real mesh makes it its own (groups, coordinate).
        mesh = meshes.canonical(DeviceMesh(layout["device"], ranks,
                                           mesh_dim_names=tuple(layout["mesh"]["names"]) or None))
        groups = []
        for g in layout["groups"]:
            ps = []
            for shape, stride, dtype, placements in g["params"]:
                pls = [Shard(d) if d is not None else Replicate() for d in placements]

                def one_row() -> DTensor:
                    local = torch.zeros([1] * len(shape), dtype=getattr(torch, dtype))
                    return DTensor.from_local(local, mesh, pls, run_check=False, shape=torch.Size(shape),
                                              stride=tuple(stride))

                p = torch.nn.Parameter(one_row())
                p.grad = one_row()
                ps.append(p)
            options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in g["options"].items()}
            groups.append({"params": ps, **options})
        opt = cls(groups)
        for _ in range(steps):
            opt.step()
        return row_bytes(opt, ranks.numel())
    finally:
        dist.destroy_process_group()


def row_bytes(optimizer: torch.optim.Optimizer, world: int) -> int:
    """The most bytes any rank of `world` writes into its buddy slot (host_slots.py) for a model
    sharded on dim 0 of a one-dimensional mesh: its rows of each parameter and of each optimizer
    state laid out as that parameter (one layout row each here: counted by their global shapes).
    0 for other meshes (HSDP keeps no buddy copy)."""
    from torch.distributed.tensor import DTensor, Shard

    from elastic._internal.worker.recovery.host_slots import ALIGN

    total = 0
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        if p.device_mesh.ndim != 1 or list(p.placements) != [Shard(0)]:
            return 0
        like = [p, *(v for v in optimizer.state[p].values() if isinstance(v, DTensor) and v.shape == p.shape)]
        rows = -(-p.shape[0] // world)  # torch.chunk's: the first ranks hold the most
        n = rows * math.prod(p.shape[1:]) * torch.empty((), dtype=p.dtype).element_size()
        total += len(like) * -(-n // ALIGN) * ALIGN
    return total
