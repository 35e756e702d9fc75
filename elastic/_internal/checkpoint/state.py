"""What a training state is made of, and how it meets a checkpoint.

A state is a nested dict with str keys whose leaves are tensors (saved by DCP, sharded) or small
JSON values (saved in the manifest). This module splits a state into the two and checks a state
against a checkpoint before anything is copied, so that a different model never loads silently
wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from elastic._internal import tree
from elastic._internal.checkpoint.shards import is_tensor_like
from elastic.errors import CheckpointError, CheckpointMismatchError
from elastic._internal.tree import Path
from elastic._internal.tree import dotted as _dotted


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
    tensors: list[tuple[Path, Any]] = []
    values: list[tuple[Path, Any]] = []
    for p, v in tree.leaves(state):
        if is_tensor_like(v):
            tensors.append((p, v))
        else:
            _check_json(v, p)
            values.append((p, _jsonable(v)))
    return tree.build(tensors), values


def _jsonable(v: Any) -> Any:
    # Round-trip now so the coordinator's manifest holds exactly what a load will see.
    return json.loads(json.dumps(v))


def like_template(template: Any, value: Any) -> Any:
    """`value` (from JSON) with tuples where the template had tuples (Adam's betas)."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(like_template(t, v) for t, v in zip(template, value)) if len(template) == len(
            value
        ) else tuple(value)
    if isinstance(template, list) and isinstance(value, list) and len(template) == len(value):
        return [like_template(t, v) for t, v in zip(template, value)]
    if isinstance(template, Mapping) and isinstance(value, dict):
        return {k: like_template(template.get(k), v) for k, v in value.items()}
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
        parent[path[-1]] = like_template(old, have[path])


def check_tensors_match(tensors: dict[str, Any], metadata: Metadata, where: str) -> None:
    """Every tensor of the state exists in the checkpoint with the same shape and dtype."""
    saved = metadata.state_dict_metadata
    for path, t in tree.tensor_leaves(tensors):
        key = tree.dotted(path)
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


def nbytes(tensors: dict[str, Any]) -> int:
    return sum(math.prod(t.shape) * t.element_size() for _, t in tree.tensor_leaves(tensors))
