"""What a training state is made of, and how it meets a checkpoint.

A state is a nested dict with str keys whose leaves are tensors (saved by DCP, sharded) or small
JSON values (saved in the manifest). This module splits a state into the two, stages tensors into
host buffers that are allocated once and reused, and checks a state against a checkpoint before
anything is copied, so that a different model never loads silently wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from elastic.errors import CheckpointError, CheckpointMismatchError

Path = tuple[str, ...]


def _dotted(path: Path) -> str:
    return ".".join(path) or "<root>"


def _check_json(value: Any, path: Path) -> None:
    """A value must round-trip through JSON (no tensors in lists, no objects)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        return  # inf/nan are written as Python's json does, and read back the same way
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, (*path[:-1], f"{path[-1]}[{i}]") if path else (f"[{i}]",))
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"state key {k!r} at {_dotted(path)} is not a str")
            _check_json(v, (*path, k))
        return
    if isinstance(value, torch.Tensor):
        raise CheckpointError(
            f"tensor inside a list at {_dotted(path)}: keep tensors in dicts (str keys)"
        )
    raise CheckpointError(
        f"cannot checkpoint {type(value).__name__} at {_dotted(path)}: leaves must be tensors "
        "or JSON values (int, float, bool, None, str, and lists/dicts of them)"
    )


def split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[Path, Any]]]:
    """(tensor tree with only tensor leaves, [(path, JSON value)] for every other leaf)."""
    values: list[tuple[Path, Any]] = []

    def walk(d: Mapping[str, Any], path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, v in d.items():
            if not isinstance(key, str):
                raise CheckpointError(
                    f"state key {key!r} under {_dotted(path)} is not a str: use str keys "
                    "(get_state_dict gives FQNs)"
                )
            p = (*path, key)
            if isinstance(v, torch.Tensor):
                out[key] = v
            elif isinstance(v, Mapping) and v:
                sub = walk(v, p)
                if sub:
                    out[key] = sub
            else:
                _check_json(v, p)
                values.append((p, _jsonable(v)))
        return out

    return walk(state, ()), values


def _jsonable(v: Any) -> Any:
    # Round-trip now so the coordinator's manifest holds exactly what a load will see.
    return json.loads(json.dumps(v))


def _like(template: Any, value: Any) -> Any:
    """`value` (from JSON) with tuples where the template had tuples (Adam's betas)."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(_like(t, v) for t, v in zip(template, value)) if len(template) == len(
            value
        ) else tuple(value)
    if isinstance(template, list) and isinstance(value, list) and len(template) == len(value):
        return [_like(t, v) for t, v in zip(template, value)]
    if isinstance(template, Mapping) and isinstance(value, dict):
        return {k: _like(template.get(k), v) for k, v in value.items()}
    return value


def apply_values(
    state: dict[str, Any], values: list[tuple[Path, Any]], where: str, *, check_only: bool = False
) -> None:
    """Set every non-tensor leaf of `state` from the checkpoint's values (in place).

    Every leaf is checked first, so a mismatch leaves `state` untouched.
    """
    _, wanted = split_state(state)
    have = {tuple(p): v for p, v in values}
    for path, _ in wanted:
        if path not in have:
            raise CheckpointMismatchError(
                f"{where}: the checkpoint has no value {_dotted(path)!r} that the state has; "
                "the checkpoint is from a different program: use a fresh checkpoint location"
            )
    if check_only:
        return
    for path, _ in wanted:
        parent: Any = state
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
        if isinstance(old, Mapping) and not old:
            continue  # an empty dict stays the same object
        parent[path[-1]] = _like(old, have[path])


def check_tensors_match(tensors: dict[str, Any], metadata: Metadata, where: str) -> None:
    """Every tensor of the state exists in the checkpoint with the same shape and dtype."""
    flat, _ = flatten_state_dict(tensors)
    saved = metadata.state_dict_metadata
    for key, t in flat.items():
        md = saved.get(key)
        mine = f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointMismatchError(
                f"{where}: key {key!r} (state {mine}) is not in the checkpoint; "
                "the checkpoint is from a different model: use a fresh checkpoint location"
            )
        theirs = f"{list(md.size)} {str(md.properties.dtype).removeprefix('torch.')}"
        if tuple(md.size) != tuple(t.shape) or md.properties.dtype != t.dtype:
            raise CheckpointMismatchError(
                f"{where}: key {key!r}: checkpoint has {theirs}, state has {mine}; "
                "the checkpoint is from a different model: use a fresh checkpoint location"
            )


class HostBuffers:
    """Host copies of the state's tensors, allocated once and reused while shapes stay the same.

    The async save stages into these so that training may modify its tensors right after save()
    returns; the foreground cost is one memcpy per tensor (no allocation after the first save).
    """

    def __init__(self) -> None:
        self._bufs: dict[Path, torch.Tensor] = {}
        self.allocations = 0
        """Buffers allocated so far (tests check it stops growing)."""

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def stage(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """A tree like `tensors` whose leaves are host copies taken now."""
        seen: set[Path] = set()
        any_cuda = False

        def walk(d: dict[str, Any], path: Path) -> dict[str, Any]:
            nonlocal any_cuda
            out: dict[str, Any] = {}
            for key, v in d.items():
                p = (*path, key)
                if isinstance(v, dict):
                    out[key] = walk(v, p)
                    continue
                src = v.detach()
                buf = self._bufs.get(p)
                if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                    pin = src.is_cuda and torch.cuda.is_available()
                    buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
                    self._bufs[p] = buf
                    self.allocations += 1
                any_cuda = any_cuda or src.is_cuda
                buf.copy_(src, non_blocking=src.is_cuda)
                seen.add(p)
                out[key] = buf
            return out

        staged = walk(tensors, ())
        if any_cuda:
            torch.cuda.synchronize()
        for stale in set(self._bufs) - seen:
            del self._bufs[stale]  # keys that left the state: free their memory
        return staged


def nbytes(tensors: dict[str, Any]) -> int:
    flat, _ = flatten_state_dict(tensors)
    return sum(math.prod(t.shape) * t.element_size() for t in flat.values())
