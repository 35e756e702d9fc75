"""Storage faults for chaos runs: a fault-injecting filesystem whose rules fire once across processes.

`chaosfs::file:///path` (any inner URL works) wraps the inner filesystem like `faulty::` does, but
each rule fires at most once in the whole run - in whichever process (driver, supervisor, worker)
first meets it - claimed through an O_EXCL marker file, so a test can assert it fired exactly once.

Rules live in JSON files under the directory named by ELASTIC_CHAOS_STORAGE (set it before Ray
starts so that every Ray process inherits it) and are re-read whenever a filesystem is built, so a
test can arm new rules for each run without restarting Ray. Rules match paths by substring: key them
to the run's directory. Worker processes learn the protocol through Ray's
`worker_process_setup_hook="elastic.chaos.hooks.storage"` (which does not import this module:
it imports torch).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec

from elastic.chaos.faults import claim
from elastic.chaos.hooks import PROTOCOL
from elastic._internal.checkpoint.faulty_fs import FaultyFileSystem, raise_injected

ENV = "ELASTIC_CHAOS_STORAGE"


@dataclass(frozen=True)
class StorageRule:
    name: str
    """Unique per run: the marker is `fault-storage-{name}`."""
    op: str
    """As in faulty_fs.OPS: open_write, write, cat, ls, info, rm, mkdir, mv, pipe, open_read, '*'."""
    path_contains: str
    """Only paths containing this substring match (include the run's directory)."""
    marker_dir: str
    kind: str = "transient"
    """transient (ConnectionResetError, retried), permanent (PermissionError) or latency."""
    latency_s: float = 0.0

    @property
    def marker(self) -> str:
        return f"fault-storage-{self.name}"


def arm(rules: list[StorageRule], rules_dir: str | os.PathLike, run_id: str) -> Path:
    """Write the rules for one run; filesystems built afterwards (in any process) apply them."""
    Path(rules_dir).mkdir(parents=True, exist_ok=True)
    path = Path(rules_dir) / f"{run_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in rules]))
    tmp.rename(path)
    return path


def _load_rules() -> list[StorageRule]:
    d = os.environ.get(ENV)
    if not d or not os.path.isdir(d):
        return []
    rules = []
    for p in sorted(Path(d).glob("*.json")):
        try:
            rules += [StorageRule(**r) for r in json.loads(p.read_text())]
        except (OSError, ValueError, TypeError):
            continue
    return rules


class ChaosFileSystem(FaultyFileSystem):
    protocol = PROTOCOL
    cachable = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("faults", [])
        super().__init__(*args, **kwargs)
        self.rules = _load_rules()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]  # type: ignore[return-value]
        path = path.removeprefix(f"{PROTOCOL}::").removeprefix(f"{PROTOCOL}://")
        if "://" in path:
            return fsspec.get_filesystem_class(path.split("://", 1)[0])._strip_protocol(path)
        return path

    def maybe_fault(self, op: str, path: str) -> None:
        self.calls[op] += 1
        for rule in self.rules:
            if rule.op not in (op, "*") or rule.path_contains not in str(path):
                continue
            if not claim(rule.marker_dir, rule.marker, f"{op} {path}"):
                continue
            if rule.latency_s:
                time.sleep(rule.latency_s)
            raise_injected(rule.kind, op, str(path))
            return


def register() -> None:
    """Make `chaosfs::` URLs resolvable in this process (also Ray's worker setup hook)."""
    fsspec.register_implementation(PROTOCOL, f"{__name__}.ChaosFileSystem", clobber=True)


register()
