"""The glue to torch.distributed.checkpoint (DCP): write shards with checksums, read them verified.

Files stay standard DCP (torch.save-serialized tensors in *.distcp, a pickled .metadata), so that a
committed step directory loads with plain `dcp.load` and `format_utils.dcp_to_torch_save`.
What we add: every byte written is checksummed on the way out; every file is checked against the
manifest before any of it is trusted; .metadata is unpickled with an allowlist of DCP classes only.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import posixpath
import threading
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import fsspec
import torch
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as _FsspecFS
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import (
    CURRENT_DCP_VERSION,
    FileSystemReader,
    _FileSystemWriter,
    _StorageInfo,
    _StoragePrefix,
)
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, SavePlan, TensorWriteData,
                                                  WriteItem, WriteItemType)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from elastic import retry, storage
from elastic.checkpoint.layout import CHECKSUM, FileEntry, checksum, hasher
from elastic.errors import CheckpointCorruptError, CheckpointError


_WRITE_BEHIND = 8 << 20  # bytes written between two write-behind requests


class _HashingStream(io.RawIOBase):
    """A write stream that counts and checksums every byte on its way to the real file, and starts
    the disk write of every few MB already written (write-behind), so that the fsync on close does
    not wait for the whole file."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self._raw = raw
        self.size = 0
        self._hash = hasher(CHECKSUM)
        self._behind = 0  # bytes up to here have had their writeback started

    @property
    def crc(self) -> int:
        return int(self._hash.intdigest())

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        self._raw.write(mv)
        self._hash.update(mv)
        self.size += len(mv)
        if self.size - self._behind >= _WRITE_BEHIND:
            self._raw.flush()
            storage.start_writeback(self._raw, self._behind, self.size - self._behind)
            self._behind = self.size
        return len(mv)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        if not self._raw.closed:
            self._raw.flush()

    def close(self) -> None:
        # DCP closes the stream itself after writing; the first close makes the file durable.
        if not self.closed:
            self.flush()
            storage.fsync_file(self._raw)
            self._raw.close()
        super().close()


class _ShardFS(_FsspecFS):
    """DCP's fsspec adapter on a given filesystem object, recording (size, crc) of files written."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        super().__init__()
        self.fs = fs
        self.written: dict[str, tuple[int, int]] = {}

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as s:
                yield s
            return
        path = str(path)
        stream = _HashingStream(self.fs.open(path, mode))
        try:
            yield stream  # type: ignore[misc]
            stream.close()
        except BaseException:
            stream.close()
            try:
                self.fs.rm(path)
            except Exception:  # noqa: BLE001 - best effort; the step dir stays uncommitted anyway
                pass
            raise
        self.written[posixpath.basename(path)] = (stream.size, stream.crc)


class _ShardWriter(_FileSystemWriter):
    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        # sync_files=False: our stream fsyncs on close where it means something (local disk);
        # DCP's fallback for other streams is a machine-wide os.sync().
        super().__init__(path=path, single_file_per_rank=True, sync_files=False, thread_count=1)
        self.fs = _ShardFS(fs)  # type: ignore[assignment]
        self.path = path  # type: ignore[assignment]


def storage_prefix(plan: SavePlan, rank: int, save_id: str) -> SavePlan:
    """Unique file names per save: a stale writer of an abandoned save never clobbers ours."""
    nonce = save_id.rsplit("-", 1)[-1][:8]
    return dataclasses.replace(plan, storage_data=_StoragePrefix(f"__{rank}_{nonce}_"))


def write_shards(
    fs: fsspec.AbstractFileSystem, step_path: str, plan: SavePlan, planner: Any, rank: int
) -> tuple[list[WriteResult], dict[str, FileEntry]]:
    """Write this rank's part of the plan; (DCP write results, {file name: entry})."""
    if storage.is_local(fs):  # object stores have no directories (s3fs would create a bucket)
        fs.makedirs(step_path, exist_ok=True)
    writer = _ShardWriter(fs, step_path)
    # Every byte is checksummed by us on its way out (the manifest records it): torch.save's own
    # per-record CRC-32 would be a second, slower pass over the same bytes. torch.load does not need it.
    with _no_torch_crc():
        fut = writer.write_data(plan, planner)
        fut.wait()
    # No directory fsync here: the commit fsyncs the step directory after writing the manifest,
    # which makes these entries durable too (and without a manifest nothing here counts).
    files = {name: FileEntry(size, crc, rank) for name, (size, crc) in writer.fs.written.items()}
    return fut.value(), files


_crc_lock = threading.Lock()
_crc_off = 0


@contextmanager
def _no_torch_crc() -> Generator[None, None, None]:
    """torch.save without its per-record CRC-32 while any shard write runs (a process-wide switch,
    counted so that concurrent writers agree; a user's torch.save meanwhile skips it too, which
    torch.load does not mind)."""
    global _crc_off
    from torch.serialization import get_crc32_options, set_crc32_options

    with _crc_lock:
        if _crc_off == 0:
            _no_torch_crc.saved = get_crc32_options()  # type: ignore[attr-defined]
            set_crc32_options(False)
        _crc_off += 1
    try:
        yield
    finally:
        with _crc_lock:
            _crc_off -= 1
            if _crc_off == 0:
                set_crc32_options(_no_torch_crc.saved)  # type: ignore[attr-defined]


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


def metadata_bytes(
    metadata: Metadata, results: list[WriteResult], checkpoint_id: str, save_id: str
) -> bytes:
    """The .metadata file DCP's own writer would produce for these results (its finish())."""
    md = dataclasses.replace(
        metadata,
        version=CURRENT_DCP_VERSION,
        storage_data={r.index: r.storage_data for r in results},
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id),
    )
    return pickle.dumps(md)


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
        self.fs = _ShardFS(fs)  # type: ignore[assignment]
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

