"""The one walker of nested state dicts: the snapshot, the checkpoint, the state transfer between
ranks and the CLI all see a state through it.

A state is a tree of dicts with str keys. Its leaves are tensors or plain values (numbers, strings,
None, and lists/tuples/dicts of them); a list is always a leaf. A leaf is named by its path of keys;
`dotted(path)` is the name DCP gives it in a checkpoint (its `flatten_state_dict` joins keys with
"."), so a path found here is the key of the same tensor in a checkpoint's metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

Path = tuple[str, ...]


def dotted(path: Path) -> str:
    """The checkpoint key of a leaf: its path joined with '.' ('<root>' for the empty path)."""
    return ".".join(path) or "<root>"


def leaves(tree: Mapping[str, Any], path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every (path, leaf) in insertion order. Empty dicts are leaves (they must round-trip)."""
    for key, value in tree.items():
        if not isinstance(key, str):
            from elastic.errors import CheckpointError

            raise CheckpointError(f"state key {key!r} under {dotted(path)} is not a str: use str keys "
                                  "(get_state_dict gives FQNs)")
        p = (*path, key)
        if isinstance(value, Mapping) and value:
            yield from leaves(value, p)
        else:
            yield p, value


def tensor_leaves(tree: Mapping[str, Any]) -> list[tuple[Path, torch.Tensor]]:
    return [(p, v) for p, v in leaves(tree) if isinstance(v, torch.Tensor)]


def count_tensors(tree: Mapping[str, Any]) -> int:
    return sum(1 for _, v in leaves(tree) if isinstance(v, torch.Tensor))


def build(items: Iterator[tuple[Path, Any]] | list[tuple[Path, Any]]) -> dict[str, Any]:
    """The nested dict holding each (path, value)."""
    root: dict[str, Any] = {}
    for path, value in items:
        if not path:
            raise ValueError("a leaf needs a non-empty path")
        parent = root
        for key in path[:-1]:
            parent = parent.setdefault(key, {})
        parent[path[-1]] = value
    return root


def map_tensors(tree: Mapping[str, Any], fn: Callable[[Path, torch.Tensor], Any]) -> dict[str, Any]:
    """A copy of the tree with every tensor leaf replaced by fn(path, tensor); other leaves kept."""
    return build((p, fn(p, v) if isinstance(v, torch.Tensor) else v) for p, v in leaves(tree))


def get(tree: Mapping[str, Any], path: Path) -> Any:
    node: Any = tree
    for key in path:
        node = node[key]
    return node

