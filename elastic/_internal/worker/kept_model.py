"""A survivor's sharded model, kept across a recovery that leaves it in the same place.

A rank whose generation broke (a peer was lost) or paused keeps the model it had sharded, and that
model's optimizer. When the next generation's training function calls prepare_model with a model
of the same structure, sharded the same way, on a mesh of the same shape where this rank has the
same coordinate, the kept model is returned instead of sharding the new one: its DTensors and
FSDP2's parameter groups are pointed at the new generation's process groups, FSDP2's per-iteration
state is reset (FSDPModule.reset_iter_state, torch >= 2.13: what a step cut short left), its
gradients are dropped, and the hooks the last generation added after prepare_model are removed.
The restore then writes the agreed step into it as into a fresh one, and the new optimizer takes
the kept one's state tensors (the restore overwrites them) instead of making its own. This is what
TorchFT does (it never rebuilds a model; it swaps the process group under it). What it saves each
survivor of a 4-rank recovery: fully_shard (0.14-0.21 s) and the optimizer's state (0.1-0.2 s),
on cores the newcomer's restore and first step need.

The model the training function built is then not used: its forward raises, naming the fix (train
what prepare_model returns), so that training it by mistake cannot pass unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from elastic.errors import ConfigError
from elastic._internal.worker import meshes

_MODULE_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks")
_TENSOR_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def supported() -> bool:
    """torch can reset FSDP2 after a step cut short (FSDPModule.reset_iter_state, torch 2.13)."""
    from torch.distributed.fsdp import FSDPModule

    return hasattr(FSDPModule, "reset_iter_state")


def structure(model: nn.Module) -> tuple[Any, ...]:
    """What must match for a kept model to stand in for `model` (taken before sharding): every
    module's name and class, every parameter's name, shape, dtype and requires_grad, every buffer's."""
    return (tuple((n, type(m).__module__, type(m).__qualname__) for n, m in model.named_modules()),
            tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()))


def mesh_place(mesh: Any) -> tuple[Any, ...]:
    """A mesh's shape, ranks and dimension names, and this rank's coordinate in it."""
    return (tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()), mesh.mesh_dim_names, mesh.device_type,
            tuple(mesh.get_coordinate() or ()))


@dataclass
class KeptModel:
    model: nn.Module
    mesh: Any
    place: tuple[Any, ...]
    """(strategy, blocks sharded, mesh_place, layout, replicated): equal, the kept rows fit the new group."""
    structure: tuple[Any, ...]
    hooks: dict[tuple[str, str, str], frozenset[Any]] = field(default_factory=dict)
    """The hook dictionaries as sharding left them: what a generation adds after it is removed."""
    optimizer: torch.optim.Optimizer | None = None
    """The optimizer the generation restored with (set when it is kept)."""


class Slot:
    """Where a process keeps its model between generations (Services holds one)."""

    def __init__(self) -> None:
        self._kept: KeptModel | None = None

    def put(self, kept: KeptModel | None) -> None:
        self._kept = kept

    def take(self) -> KeptModel | None:
        """The kept model, which the slot no longer holds (not reused, it is freed)."""
        kept, self._kept = self._kept, None
        return kept


def record(model: nn.Module, mesh: Any, place: tuple[Any, ...], built: tuple[Any, ...]) -> KeptModel:
    """A model just sharded, as it would be kept (its hooks as sharding left them)."""
    return KeptModel(model, mesh, place, built, hooks=_hook_keys(model))


def reuse(kept: KeptModel | None, built: nn.Module, mesh: Any, place: tuple[Any, ...],
          built_structure: tuple[Any, ...]) -> nn.Module | None:
    """The kept model, ready for this generation's `mesh`, if it can stand in for `built` (which
    is then retired); None (shard `built`) otherwise."""
    if kept is None or kept.place != place or kept.structure != built_structure or not supported():
        return None
    try:
        _rebind(kept.model, kept.mesh, mesh)
        if kept.model._get_fsdp_state()._is_root:  # type: ignore[operator]  # else it never ran a forward
            kept.model.reset_iter_state()  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - whatever the last step left that cannot be reset: shard afresh
        return None
    _drop_gradients(kept.model)
    _trim_hooks(kept.model, kept.hooks)
    for mine, theirs in zip(kept.model.modules(), built.modules()):
        mine.training = theirs.training
    built.register_forward_pre_hook(_refuse)
    return kept.model


def adopt_optimizer_state(optimizer: torch.optim.Optimizer | None, previous: torch.optim.Optimizer | None) -> bool:
    """Give `optimizer` (new, without state) `previous`'s state tensors when both hold the same
    parameters in the same groups, with the same options (a restore then overwrites every value);
    whether it did."""
    if optimizer is None or previous is None or optimizer is previous or optimizer.state:
        return False
    if type(optimizer) is not type(previous) or len(optimizer.param_groups) != len(previous.param_groups):
        return False
    for new, old in zip(optimizer.param_groups, previous.param_groups):
        same_params = len(new["params"]) == len(old["params"]) and all(a is b for a, b in zip(new["params"],
                                                                                             old["params"]))
        options = {k: v for k, v in new.items() if isinstance(v, (bool, str)) or v is None}
        if not same_params or new.keys() != old.keys() or any(old[k] != v for k, v in options.items()):
            return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params or any(not previous.state.get(p) for p in params):
        return False
    for p in params:
        optimizer.state[p] = dict(previous.state[p])
    return True


def _refuse(*_: Any) -> None:
    raise ConfigError("this model was replaced by the one ctx.prepare_model returned (the survivor's own, kept "
                      "across the recovery): train the returned model (model = ctx.prepare_model(model, ...))")


def _rebind(model: nn.Module, kept_mesh: Any, mesh: Any) -> None:
    """Point the kept mesh (every DTensor of the model holds it) and FSDP2's cached groups at this
    generation's process groups: a DeviceMesh looks its groups up by name at each use, FSDP2's mesh
    infos hold them (recomputed from the mesh by their __post_init__)."""
    from torch.distributed.fsdp import FSDPModule

    meshes.adopt(kept_mesh, mesh)  # prepare_model's mesh already is the kept one (meshes.canonical)
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        for group in m._get_fsdp_state()._fsdp_param_groups:
            infos = [group.mesh_info, group.post_forward_mesh_info]
            infos += [i for fp in group.fsdp_params for i in (fp.mesh_info, fp.post_forward_mesh_info)]
            for info in {id(i): i for i in infos if i is not None}.values():
                info.__post_init__()


def _drop_gradients(model: nn.Module) -> None:
    """A step cut short leaves gradients where a fresh model has none: on the sharded parameters,
    and on FSDP2's unsharded ones (a backward cut before their reduce-scatter), which the next
    backward would add to."""
    from torch.distributed.fsdp import FSDPModule

    for p in model.parameters():
        p.grad = None
    for m in model.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                for fp in group.fsdp_params:
                    if hasattr(fp, "_unsharded_param"):
                        fp._unsharded_param.grad = None
                    fp.unsharded_accumulated_grad = None


def _hook_dicts(model: nn.Module) -> dict[tuple[str, str, str], Any]:
    out: dict[tuple[str, str, str], Any] = {}
    for name, m in model.named_modules():
        for attr in _MODULE_HOOKS:
            out[("module", name, attr)] = getattr(m, attr, None)
    for name, p in model.named_parameters():
        for attr in _TENSOR_HOOKS:
            out[("param", name, attr)] = getattr(p, attr, None)
    return out


def _hook_keys(model: nn.Module) -> dict[tuple[str, str, str], frozenset[Any]]:
    return {k: frozenset(d) for k, d in _hook_dicts(model).items() if d is not None}


def _trim_hooks(model: nn.Module, recorded: dict[tuple[str, str, str], frozenset[Any]]) -> None:
    for key, d in _hook_dicts(model).items():
        if d is not None:
            for handle_id in [k for k in d if k not in recorded.get(key, frozenset())]:
                del d[handle_id]
