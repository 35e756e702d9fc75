"""A fault-injecting fsspec filesystem, for tests and the chaos suite.

Wraps any filesystem and, on chosen operations, raises a transient error (ConnectionResetError,
which the retry policies retry), a permanent one (PermissionError, which they do not), or adds
latency. Decisions come from a random.Random seeded per instance, so a run is reproducible, and
every firing is counted (`fired`) so that tests can assert each fault happened.

Use it by wrapping:   FaultyFileSystem(fs=fsspec.filesystem("memory"), faults=[Fault("write")])
or from a URI:        faulty::file:///tmp/run   with faults from the ELASTIC_FAULTS environment
variable (JSON: {"seed": 1, "faults": [{"op": "write", "kind": "transient", "times": 1}]}),
which reaches worker processes that build their storage from the URI alone.
"""

from __future__ import annotations

import errno
import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.spec import AbstractFileSystem

ENV = "ELASTIC_FAULTS"
OPS = (
    "open_read", "open_write", "write", "cat", "pipe", "ls", "info", "rm", "mkdir", "mv", "*",
)  # fmt: skip
KINDS = ("transient", "permanent", "latency")


@dataclass(frozen=True)
class Fault:
    """One rule: when `op` is called on a path containing `path_contains`, maybe misbehave."""

    op: str
    """One of OPS ("write" is each write() on a file opened for writing; "*" is any op)."""
    kind: str = "transient"
    """"transient" (ConnectionResetError), "permanent" (PermissionError) or "latency" only."""
    probability: float = 1.0
    """Chance per matching call, drawn from the seeded generator."""
    after: int = 0
    """Let this many matching calls through first."""
    times: int | None = None
    """Fire at most this many times (None: no limit)."""
    latency_s: float = 0.0
    """Sleep this long before the call whenever the rule fires (any kind)."""
    path_contains: str = ""
    """Only paths containing this substring match."""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown fault op {self.op!r}: use one of {', '.join(OPS)}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("fault probability must be within [0, 1]")


def faults_to_env(faults: Iterable[Fault], seed: int = 0) -> str:
    """The ELASTIC_FAULTS value for these rules (to pass to worker processes)."""
    return json.dumps({"seed": seed, "faults": [asdict(f) for f in faults]})


def _from_env() -> tuple[list[Fault], int]:
    raw = os.environ.get(ENV)
    if not raw:
        return [], 0
    doc = json.loads(raw)
    return [Fault(**f) for f in doc.get("faults", [])], int(doc.get("seed", 0))


class _FaultyFile:
    """A file opened for writing whose write() calls go through the fault rules."""

    def __init__(self, inner: Any, owner: FaultyFileSystem, path: str) -> None:
        self._inner = inner
        self._owner = owner
        self._path = path

    def write(self, data: Any) -> int:
        self._owner.maybe_fault("write", self._path)
        return self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._inner.close()


class FaultyFileSystem(ChainedFileSystem):
    """Delegates to `inner_fs`, misbehaving as the fault rules say."""

    protocol = "faulty"
    cachable = False  # each instance has its own counters and random generator

    def __init__(
        self,
        fs: AbstractFileSystem | None = None,
        faults: Iterable[Fault] | None = None,
        seed: int | None = None,
        *,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        fo: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if fs is None:
            fs = fsspec.filesystem(target_protocol or "file", **(target_options or {}))
        env_faults, env_seed = _from_env() if faults is None else ([], 0)
        self.inner_fs = fs
        self.faults = list(faults) if faults is not None else env_faults
        self.seed = seed if seed is not None else env_seed
        self._rng = random.Random(self.seed)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._seen: Counter[int] = Counter()
        self.fired: Counter[int] = Counter()
        """Times each rule (by index in `faults`) fired."""
        self.calls: Counter[str] = Counter()
        """Calls per op, faulted or not."""

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]  # type: ignore[return-value]
        path = path.removeprefix("faulty::").removeprefix("faulty://")
        if "://" in path:
            return fsspec.get_filesystem_class(path.split("://", 1)[0])._strip_protocol(path)
        return path

    def maybe_fault(self, op: str, path: str) -> None:
        """Apply the first rule that fires for (op, path): sleep and/or raise."""
        with self._lock:
            self.calls[op] += 1
            fire: Fault | None = None
            for i, f in enumerate(self.faults):
                if f.op not in (op, "*") or f.path_contains not in str(path):
                    continue
                self._seen[i] += 1
                if self._seen[i] <= f.after or (f.times is not None and self.fired[i] >= f.times):
                    continue
                if f.probability < 1.0 and self._rng.random() >= f.probability:
                    continue
                self.fired[i] += 1
                fire = f
                break
        if fire is None:
            return
        if fire.latency_s:
            self._sleep(fire.latency_s)
        raise_injected(fire.kind, op, path)

    # -- delegated operations ------------------------------------------------------------
    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        writing = any(c in mode for c in "wax+")
        self.maybe_fault("open_write" if writing else "open_read", path)
        f = self.inner_fs.open(path, mode, **kwargs)
        return _FaultyFile(f, self, path) if writing else f

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:  # fmt: skip
        self.maybe_fault("cat", path)
        return self.inner_fs.cat_file(path, start=start, end=end, **kwargs)

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        self.maybe_fault("pipe", path)
        self.inner_fs.pipe_file(path, value, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self.maybe_fault("ls", path)
        return self.inner_fs.ls(path, detail=detail, **kwargs)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        self.maybe_fault("info", path)
        return self.inner_fs.info(path, **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        self.maybe_fault("info", path)
        return self.inner_fs.exists(path, **kwargs)

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        self.maybe_fault("rm", path)
        self.inner_fs.rm(path, recursive=recursive, maxdepth=maxdepth)

    def rm_file(self, path: str) -> None:
        self.maybe_fault("rm", path)
        self.inner_fs.rm_file(path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.maybe_fault("mkdir", path)
        self.inner_fs.makedirs(path, exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.maybe_fault("mkdir", path)
        self.inner_fs.mkdir(path, create_parents=create_parents, **kwargs)

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        self.maybe_fault("mv", path1)
        self.inner_fs.mv(path1, path2, **kwargs)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.inner_fs.invalidate_cache(path)


def raise_injected(kind: str, op: str, path: str) -> None:
    """Raise the error a real backend would for an injected fault of `kind` (latency: none)."""
    if kind == "transient":
        raise ConnectionResetError(errno.ECONNRESET, f"injected transient fault: {op} {path}")
    if kind == "permanent":
        raise PermissionError(errno.EACCES, f"injected permanent fault: {op} {path}")
