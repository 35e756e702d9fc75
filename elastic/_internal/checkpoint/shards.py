"""Pieces of a tensor that one rank holds (FSDP2 shards), and the DCP save planner that writes a state
made of whole tensors and such pieces.

A sharded model's state is not one dict every rank holds: each rank holds rows of each parameter and
of its optimizer state (FSDP2 splits dimension 0 the way torch.chunk does). Elastic keeps those rows
in host memory (its snapshot, and a copy of a buddy's) and writes checkpoints from there, so a
checkpoint item is either a whole tensor (replicated: DCP writes it once, from one rank) or a
`Shards` leaf: the global shape and the chunks this rank writes. A rank may write several chunks of
one tensor: its own rows and, after a loss, the rows of the rank whose copy it kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from elastic._internal import tree


@dataclass
class Shards:
    """Some chunks of a tensor of `global_shape`: (offsets, local tensor) each."""

    global_shape: tuple[int, ...]
    chunks: list[tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return self.chunks[0][1].dtype if self.chunks else torch.float32

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.chunks)


def row_chunks(rows: int, world: int) -> list[tuple[int, int]]:
    """(start, stop) rows of each rank when `rows` are split as FSDP2 splits dim 0 (torch.chunk:
    ceil(rows / world) each, the last ones shorter or empty)."""
    step = -(-rows // world) if rows else 0
    return [(min(rows, r * step), min(rows, (r + 1) * step)) for r in range(world)]


def is_tensor_like(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, Shards))


class EntriesSavePlanner(DefaultSavePlanner):
    """A DCP planner for a state whose tensor leaves are tensors (replicated: written once, by the
    lowest rank that has them, as DCP deduplicates) or Shards (each chunk written by its holder)."""

    def __init__(self) -> None:
        # flatten_state_dict=True only so that DCP records our path mappings in the metadata (dcp.load
        # and dcp_to_torch_save rebuild nested dicts from them): we never hand it a nested state.
        super().__init__(flatten_state_dict=True, dedup_save_to_lowest_rank=False)
        self._objects: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
        self._leaves = list(tree.leaves(state_dict))
        self.is_coordinator = is_coordinator
        self.mappings = {tree.dotted(p): p for p, _ in self._leaves}

    def create_local_plan(self) -> SavePlan:
        items = []
        for path, v in self._leaves:
            fqn = tree.dotted(path)
            if isinstance(v, torch.Tensor):
                offsets = (0,) * v.dim()
                items.append(_item(fqn, offsets, v, tuple(v.shape), WriteItemType.TENSOR))
                self._objects[(fqn, offsets)] = v
            elif isinstance(v, Shards):
                for offsets, t in v.chunks:
                    if t.numel() == 0:
                        continue  # an empty chunk (more ranks than rows): nothing to write
                    items.append(_item(fqn, tuple(offsets), t, tuple(v.global_shape), WriteItemType.SHARD))
                    self._objects[(fqn, tuple(offsets))] = t
        self.plan = SavePlan(items, planner_data=self.mappings)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        offsets = tuple(write_item.index.offset or ())
        return self._objects[(write_item.index.fqn, offsets)]


def _item(fqn: str, offsets: tuple[int, ...], t: torch.Tensor, size: tuple[int, ...],
          kind: WriteItemType) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(fqn, torch.Size(offsets)),
        type=kind,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.size()),
            properties=TensorProperties(dtype=t.dtype), size=torch.Size(size)))


def replace_plan(plan: SavePlan, **kw: Any) -> SavePlan:
    return dataclasses.replace(plan, **kw)
