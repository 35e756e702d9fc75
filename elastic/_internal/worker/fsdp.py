"""FSDP2 over a generation's training group: which modules to shard, and the mesh to shard them on.

`fully_shard` is applied to each block (the modules the user names, or a default) and then to the
root, on a one-dimensional DeviceMesh built from the generation's training group (gloo on CPU,
NCCL on GPUs), or on HSDP's two-dimensional one (hsdp.py). Every rank then holds rows of each
parameter (dimension 0, split as torch.chunk splits it) and the same rows of its optimizer state,
as DTensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from elastic.errors import ConfigError


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a model, for sharding one at a time: the items of its largest ModuleList or
    Sequential (a transformer's layers), else its direct children that hold parameters."""
    best: list[nn.Module] = []
    for m in model.modules():
        if m is not model and isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > len(best):
            best = [c for c in m if any(True for _ in c.parameters())]
    if len(best) >= 2:
        return best
    if isinstance(model, nn.Sequential):
        return [c for c in model if any(True for _ in c.parameters())]
    return [c for c in model.children() if any(True for _ in c.parameters())]


def flat_mesh(train_group: Any, device: torch.device) -> Any:
    """A one-dimensional DeviceMesh over the whole training group."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(train_group, device.type)


def blocks(model: nn.Module, shard_modules: Iterable[nn.Module] | Iterable[type] | None = None) -> list[nn.Module]:
    """The modules to shard one at a time: those named (instances, or every module of the given
    classes), else default_blocks."""
    if shard_modules is None:
        return default_blocks(model)
    given = list(shard_modules)
    if given and all(isinstance(g, type) for g in given):
        return [m for m in model.modules() if m is not model and isinstance(m, tuple(given))]
    return [m for m in given if isinstance(m, nn.Module)]


def shard(model: nn.Module, mesh: Any, device: torch.device,
          shard_modules: Iterable[nn.Module] | Iterable[type] | None = None) -> nn.Module:
    """Apply FSDP2 to `model` in place (its blocks, then the root) on `mesh` (a 2-D mesh is HSDP);
    returns it."""
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    for block in blocks(model, shard_modules):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """ConfigError if `optimizer` holds parameters `model` no longer has: sharding replaces every
    parameter with a sharded one, so an optimizer built before it (the DDP order) would update the
    old, unsharded tensors, and saving it fails with an opaque `KeyError: 0` on every rank."""
    if optimizer is None:
        return
    held = {id(p) for p in model.parameters()}
    if any(id(p) not in held and not is_sharded(p) for g in optimizer.param_groups for p in g["params"]):
        raise ConfigError("the optimizer holds the model's parameters from before sharding: build the optimizer "
                          "after ctx.prepare_model(model, strategy='fsdp'), then call ctx.restore(state)")


def is_sharded(t: Any) -> bool:
    """A DTensor (a rank's rows of a sharded tensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_chunk(t: Any) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this rank's rows, as a plain tensor sharing their memory; their offsets in the whole tensor;
    the whole tensor's shape)."""
    local = t.to_local().detach()
    chunks = t.__create_chunk_list__()  # DCP's own protocol: where this rank's rows sit
    offsets = tuple(chunks[0].offsets) if chunks else (0,) * t.dim()
    return local, offsets, tuple(t.shape)



def init_optimizer_state(optimizer: torch.optim.Optimizer | None) -> None:
    """Create the state of an optimizer that has none, which torch's get_state_dict does before it
    reads one (a step with zero gradients at lr 0: ≈ 0.5 s of a recovery at 25 M parameters, all of
    it the optimizer's arithmetic and DTensor's dispatch), but by a step on meta stand-ins, then real
    zeros. Its values do not matter (a restore overwrites them), its structure does: kept only when
    every state tensor is a scalar or shaped like its parameter's rows (a DTensor laid out like the
    parameter, as torch's step makes it); an optimizer that cannot step on meta tensors, or keeps
    other shapes, is left without state for torch's own step.

    One stand-in per kind of parameter (its group, and its rows' shape and dtype), whose state every
    parameter of that kind gets a copy of: torch's optimizers are Python loops over parameters, and a
    meta step over all 102 of the benchmark's LM took 0.15 s of a recovery's critical path (0.01 s
    over its 14 kinds)."""
    if optimizer is None or optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(p.grad is not None for p in params) or not any(is_sharded(p) for p in params):
        return  # torch's own rules (gradients: no step) and plain tensors: nothing to gain
    rows = {id(p): (p.to_local() if is_sharded(p) else p) for p in params}
    kind = {id(p): (i, tuple(rows[id(p)].shape), rows[id(p)].dtype) for i, g in enumerate(optimizer.param_groups)
            for p in g["params"]}
    meta = {k: torch.empty(k[1], dtype=k[2], device="meta") for k in dict.fromkeys(kind.values())}
    saved = [g["params"] for g in optimizer.param_groups]
    stepped = False
    try:
        for i, g in enumerate(optimizer.param_groups):
            g["params"] = [t for k, t in meta.items() if k[0] == i]
        for t in meta.values():
            t.grad = torch.empty_like(t)
        optimizer.step()
        stepped = True
    except Exception:  # noqa: BLE001 - this optimizer needs real values: torch's step will run
        pass
    finally:
        for g, ps in zip(optimizer.param_groups, saved):
            g["params"] = ps
    made = {k: optimizer.state.pop(t, {}) for k, t in meta.items()}
    optimizer.state.clear()  # a step cut short leaves some parameters' state only: none is kept
    if stepped and all(not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape == k[1]
                       for k, state in made.items() for v in state.values()):
        for p in params:
            if made[kind[id(p)]]:
                optimizer.state[p] = {k: _like_param(v, p, rows[id(p)]) for k, v in made[kind[id(p)]].items()}


def _like_param(v: Any, p: Any, rows: torch.Tensor) -> Any:
    """A state value made on a meta stand-in, made real: zeros on the rows' device, and a DTensor
    laid out like `p` when shaped like its rows."""
    if not isinstance(v, torch.Tensor):
        return v
    if v.device.type == "meta":
        v = torch.zeros(v.shape, dtype=v.dtype, device=rows.device)
    else:
        v = v.clone()  # one stand-in's state serves every parameter of its kind: none may share it
    if v.dim() > 0 and is_sharded(p):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return v
