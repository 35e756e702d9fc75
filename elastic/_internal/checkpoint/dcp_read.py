"""Reading DCP checkpoints verified: every file checked against the manifest before any of it is
trusted, tensors deserialized weights-only, .metadata unpickled with an allowlist of DCP classes
only (no code from storage runs). What wrote them is elastic._internal.checkpoint.dcp_write.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import fsspec
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from elastic._internal import retry, storage
from elastic._internal.checkpoint.dcp_write import ShardFS
from elastic._internal.checkpoint.layout import CHECKSUM, FileEntry, checksum
from elastic.errors import CheckpointCorruptError


_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and refuses every other global (no code from storage runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def load_metadata(data: bytes, where: str) -> Metadata:
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is not trustworthy
        raise CheckpointCorruptError(f"{where}: unreadable DCP metadata ({exc})") from None
    if not isinstance(md, Metadata):
        raise CheckpointCorruptError(f"{where}: .metadata holds {type(md).__name__}")
    return md


def read_verified(
    fs: fsspec.AbstractFileSystem, step_path: str, name: str, files: dict[str, FileEntry],
    where: str, algo: str = CHECKSUM,
) -> bytes:  # fmt: skip
    """A whole file, checked against its manifest entry; CheckpointCorruptError otherwise."""
    entry = files.get(name)
    if entry is None:
        raise CheckpointCorruptError(f"{where}/{name}: not listed in the manifest")
    path = storage.join(step_path, name)
    try:
        data = retry.call(retry.STORAGE_READ, lambda: fs.cat_file(path), op="read", uri=where)
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{where}/{name}: missing") from None
    if len(data) != entry.size:
        raise CheckpointCorruptError(
            f"{where}/{name}: {len(data)} bytes, manifest says {entry.size} (short or overwritten)"
        )
    got = checksum(data, algo)
    if got != entry.checksum:
        raise CheckpointCorruptError(
            f"{where}/{name}: checksum mismatch ({algo} {got:08x}, manifest {entry.checksum:08x})"
        )
    return data


class VerifyingReader(FileSystemReader):
    """DCP reader that reads each needed file once, verifies it, then deserializes weights-only."""

    def __init__(
        self, fs: fsspec.AbstractFileSystem, step_path: str, files: dict[str, FileEntry],
        metadata: Metadata, where: str, algo: str = CHECKSUM,
    ) -> None:  # fmt: skip
        super().__init__(step_path)
        self.fs = ShardFS(fs)  # type: ignore[assignment]
        self.path = step_path  # type: ignore[assignment]
        self._raw_fs = fs
        self._files = files
        self._metadata = metadata
        self._where = where
        self._algo = algo

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(
                item
            )
        for rel, items in sorted(per_file.items()):
            data = read_verified(self._raw_fs, self.path, rel, self._files, self._where, self._algo)
            base = io.BytesIO(data)  # shares the bytes: no copy
            for req in items:
                info: _StorageInfo = self.storage_data[req.storage_index]
                if req.type == LoadItemType.BYTE_IO:
                    # we never write pickled objects; a checkpoint that has some is not ours
                    raise CheckpointCorruptError(f"{self._where}/{rel}: unexpected pickled object")
                view = FileWindow(base, info.offset, info.length)
                tensor = torch.load(view, map_location="cpu", weights_only=True)
                for dim, (offset, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                    tensor = tensor.narrow(dim, offset, length)  # the chunk this request reads
                target = planner.resolve_tensor(req).detach()
                if target.size() != tensor.size():
                    raise CheckpointCorruptError(
                        f"{self._where}/{rel}: chunk of {req.storage_index.fqn} has shape "
                        f"{list(tensor.size())}, expected {list(target.size())}"
                    )
                target.copy_(tensor)
                planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


class FileWindow(io.RawIOBase):
    """`length` bytes of `base` from `offset`, as a file of their own (one tensor in a shard file)."""

    def __init__(self, base: Any, offset: int, length: int):
        super().__init__()
        self._base, self._start, self._len, self._pos = base, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._len - self._pos)
        if n <= 0:
            return 0
        self._base.seek(self._start + self._pos)
        data = self._base.read(n)
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)


def run_load(state: dict[str, Any], reader: VerifyingReader, planner: LoadPlanner) -> None:
    """DCP's load sequence for one process, without collectives (DDP replicas read everything)."""
    md = reader.read_metadata()
    planner.set_up_planner(state, md, True)
    reader.set_up_storage_reader(md, True)
    plan = planner.create_local_plan()
    plan = reader.prepare_local_plan(plan)
    plan = planner.create_global_plan([plan])[0]
    plan = planner.finish_plan(reader.prepare_global_plan([plan])[0])
    reader.read_data(plan, planner).wait()


def default_load_planner() -> DefaultLoadPlanner:
    return DefaultLoadPlanner(flatten_state_dict=True, allow_partial_load=False)

