"""The on-storage layout of checkpoints and the manifest, the commit marker.

    URI/checkpoints/step_00000020/            DCP shard files (*.distcp) and .metadata
    URI/checkpoints/step_00000020/manifest.json   written last: the checkpoint exists once it does

The manifest lists every file with its size and checksum (computed by the rank that wrote the file
as the bytes went out: xxh3-64, ~20 GB/s; manifests of older versions say crc32, still read), and
carries the non-tensor values of the state as JSON, so that loading never unpickles them.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from elastic.errors import CheckpointCorruptError

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
FORMAT = "elastic-checkpoint/1"
_STEP_RE = re.compile(r"^step_(\d{8,})$")

COMMITTED = "committed"
PARTIAL = "partial"
CORRUPT = "corrupt"


def step_dirname(step: int) -> str:
    """step_00000020: zero-padded so that names sort like steps."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step:08d}"


def parse_step_dirname(name: str) -> int | None:
    """The step of a step directory name, or None for anything else."""
    m = _STEP_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


CHECKSUM = "xxh3-64"
"""What new manifests use. CRC-32 (zlib, ~3.6 GB/s here) was a pass over every byte that cost as much
as writing them; xxh3 (~20 GB/s) is as good at catching corruption and nearly free."""
LEGACY_CHECKSUM = "crc32"


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    """Running CRC-32 (the checksum of manifests that do not name one)."""
    return zlib.crc32(data, value)


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = zlib.crc32(data, self.value)

    def intdigest(self) -> int:
        return self.value


def hasher(algo: str = CHECKSUM) -> Any:
    """A streaming checksum: .update(bytes), .intdigest()."""
    if algo == LEGACY_CHECKSUM:
        return _Crc32()
    if algo == "xxh3-64":
        import xxhash

        return xxhash.xxh3_64()
    raise CheckpointCorruptError(f"unknown checksum {algo!r}: written by a newer elastic? upgrade it")


def checksum(data: bytes | memoryview, algo: str = CHECKSUM) -> int:
    h = hasher(algo)
    h.update(data)
    return int(h.intdigest())


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint as the supervisor, CLI and events see it (pickles across Ray actors)."""

    step: int
    uri: str
    """URL of the step directory."""
    world_size: int
    """Ranks that wrote it (0 when unknown: a partial checkpoint)."""
    time: float
    """Unix time of the commit (0.0 when unknown)."""
    bytes: int
    """Total size of its files."""
    status: str
    """"committed" | "partial" | "corrupt"."""
    seconds: float | None = None
    """Save duration from the call to save() to the commit, where known."""
    skipped: tuple[int, ...] = ()
    """On load: newer committed steps that failed verification and were skipped."""
    problems: tuple[str, ...] = ()
    """On list(verify=True): what verification found."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    checksum: int
    rank: int


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    time: float
    seconds: float
    save_id: str
    files: dict[str, FileEntry]
    values: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)
    """Non-tensor leaves of the state: (path of keys, JSON value)."""
    checksum: str = LEGACY_CHECKSUM
    """The algorithm of the files' checksums (a manifest that names none used crc32)."""
    lease: int = 0
    """The fencing token of the run that committed it (elastic._internal.lease); 0: written without a lease."""

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "step": self.step,
            "world_size": self.world_size,
            "time": self.time,
            "seconds": self.seconds,
            "save_id": self.save_id,
            "bytes": self.bytes,
            "checksum": self.checksum,
            "files": {
                name: {"size": f.size, self._key: f"{f.checksum:08x}", "rank": f.rank}
                for name, f in sorted(self.files.items())
            },
            "values": [[list(path), value] for path, value in self.values],
            "lease": self.lease,
        }
        return json.dumps(doc, indent=1).encode()

    @property
    def _key(self) -> str:
        return "crc32" if self.checksum == LEGACY_CHECKSUM else "checksum"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse a manifest; CheckpointCorruptError if it is not one of ours."""
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            return cls(
                step=int(doc["step"]),
                world_size=int(doc["world_size"]),
                time=float(doc["time"]),
                seconds=float(doc.get("seconds") or 0.0),
                save_id=str(doc.get("save_id", "")),
                files={
                    str(name): FileEntry(int(f["size"]), int(f.get("checksum", f.get("crc32")), 16), int(f["rank"]))
                    for name, f in doc["files"].items()
                },
                checksum=str(doc.get("checksum") or LEGACY_CHECKSUM),
                values=[(tuple(path), value) for path, value in doc.get("values", [])],
                lease=int(doc.get("lease") or 0),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointCorruptError(f"{where}: unreadable manifest ({exc})") from None
