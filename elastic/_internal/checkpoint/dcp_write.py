"""Writing DCP shards: every byte checksummed on its way out, the disk write started behind it.

The files stay standard DCP (torch.save-serialized tensors in *.distcp, a pickled .metadata) so that a
committed step directory loads with plain `dcp.load`; what this module adds is the (size, checksum)
of each file written, for the manifest, and names unique to each save. Reading them back verified
is elastic._internal.checkpoint.dcp_read; plans and results crossing between ranks, elastic._internal.checkpoint.dcp_wire.
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
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as _FsspecFS
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _FileSystemWriter, _StoragePrefix
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.storage import WriteResult

from elastic._internal import storage
from elastic._internal.checkpoint.layout import CHECKSUM, FileEntry, hasher


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


class ShardFS(_FsspecFS):
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
        self.fs = ShardFS(fs)  # type: ignore[assignment]
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
