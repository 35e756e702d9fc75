"""Save plans and write results as JSON: they cross the control plane and the store between ranks,
and elastic never unpickles what another process sent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from elastic.errors import CheckpointError


def encode_plan(plan: SavePlan) -> dict[str, Any]:
    """A local save plan as JSON (plans cross the control plane; we never unpickle what others
    sent). Only tensor items exist: non-tensor values go to the manifest."""
    items = []
    for it in plan.items:
        td = it.tensor_data
        if it.bytes_io_data is not None or td is None:
            raise CheckpointError(f"{it.index.fqn}: only tensors are saved as DCP items")
        props = td.properties
        items.append([it.index.fqn, _opt_list(it.index.offset), it.index.index, int(it.type.value),
                      list(td.chunk.offsets), list(td.chunk.sizes), list(td.size), str(props.dtype).removeprefix("torch."),
                      bool(props.requires_grad), bool(props.pin_memory)])
    mappings = {k: list(v) for k, v in (plan.planner_data or {}).items()}
    return {"items": items, "mappings": mappings}


def decode_plan(doc: dict[str, Any]) -> SavePlan:
    items = []
    for fqn, offset, index, typ, offsets, sizes, size, dtype, requires_grad, pin in doc["items"]:
        dt = getattr(torch, str(dtype), None)
        if not isinstance(dt, torch.dtype):
            raise CheckpointError(f"{fqn}: unknown dtype {dtype!r} in a peer's save plan")
        items.append(WriteItem(
            index=MetadataIndex(str(fqn), torch.Size(offset) if offset is not None else None, index),
            type=WriteItemType(int(typ)),
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                properties=TensorProperties(dtype=dt, requires_grad=bool(requires_grad), pin_memory=bool(pin)),
                size=torch.Size(size))))
    return SavePlan(items=items, planner_data={k: tuple(v) for k, v in doc.get("mappings", {}).items()})


def _opt_list(size: Any) -> list[int] | None:
    return None if size is None else [int(v) for v in size]


def encode_results(results: list[WriteResult]) -> list[list[Any]]:
    """WriteResults as JSON (they cross the store; we never unpickle what others sent)."""
    out = []
    for r in results:
        si: _StorageInfo = r.storage_data
        offset = list(r.index.offset) if r.index.offset is not None else None
        out.append([r.index.fqn, offset, r.index.index, r.size_in_bytes,
                    si.relative_path, si.offset, si.length])  # fmt: skip
    return out


def decode_results(rows: list[list[Any]]) -> list[WriteResult]:
    return [
        WriteResult(
            index=MetadataIndex(fqn, torch.Size(off) if off is not None else None, idx),
            size_in_bytes=int(size),
            storage_data=_StorageInfo(str(rel), int(foff), int(flen)),
        )
        for fqn, off, idx, size, rel, foff, flen in rows
    ]
