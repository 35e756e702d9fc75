"""Flatten a nested state dict into (skeleton, tensors) and back.

The skeleton keeps every non-tensor value and a placeholder for each tensor, so that tensors can be
copied into reused buffers or sent over a process group in one canonical order, and the dict rebuilt
on the other side.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorSlot:
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def flatten(sd: Any) -> tuple[Any, list[torch.Tensor]]:
    tensors: list[torch.Tensor] = []

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return TensorSlot(len(tensors) - 1, tuple(node.shape), node.dtype)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return copy.deepcopy(node)

    return walk(sd), tensors


def unflatten(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    def walk(node: Any) -> Any:
        if isinstance(node, TensorSlot):
            return tensors[node.index]
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return copy.deepcopy(node)

    return walk(skeleton)


def slots(skeleton: Any) -> list[TensorSlot]:
    found: list[TensorSlot] = []

    def walk(node: Any) -> None:
        if isinstance(node, TensorSlot):
            found.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(skeleton)
    return sorted(found, key=lambda s: s.index)
