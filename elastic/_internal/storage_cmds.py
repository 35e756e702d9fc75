"""The storage side of the CLI: ls, inspect, verify, export, events.

Each command returns an exit code and prints human-readable text to stdout; a failure prints one
line on stderr starting with `error: ` and returns the error's exit code (2 for a wrong URI, a file
given as a location, storage that cannot be reached at all, or nothing to act on; 1 for a failed
verification or a storage error while reading).
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

import fsspec
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from elastic._internal import retry, storage, tree
from elastic._internal.checkpoint import CheckpointStore
from elastic._internal.checkpoint.layout import COMMITTED
from elastic._internal.checkpoint.loading import open_step
from elastic.errors import ConfigError, ElasticError, NoCheckpointError, StorageUnavailableError
from elastic._internal.events import EVENTS_FILE, Event, format_event, parse_lines, read_events, read_lines


def _guard(fn: Callable[[], int], err: TextIO | None = None) -> int:
    try:
        return fn()
    except ElasticError as exc:
        print(f"error: {retry.redact(str(exc))}", file=err or sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {retry.redact(f'{type(exc).__name__}: {exc}')}", file=err or sys.stderr)
        return 1


def open_location(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root) of a run's location, for any command given one: a one-line error (exit 2)
    when its storage cannot be reached at all, or when it names a file rather than a location."""
    try:
        fs, root = storage.resolve(uri)
        is_file = fs.isfile(root)
    except OSError as exc:  # e.g. a filesystem that connects as it is built (ftp://, sftp://)
        raise StorageUnavailableError(retry.redact(
            f"cannot reach the storage of {uri} ({type(exc).__name__}: {exc}): check the URI, host and "
            "port")) from None
    if is_file:
        raise ConfigError(retry.redact(
            f"{uri} is a file, not a run's location: give the directory or URI the run was started with "
            "(its --checkpoint-uri)"))
    return fs, root


def _store_with_run(uri: str) -> CheckpointStore:
    """The run's CheckpointStore; NoCheckpointError (exit 2) when nothing is there at all."""
    open_location(uri)
    cs = CheckpointStore(uri)
    if cs.list():
        return cs
    if not _events_exist(cs):
        raise NoCheckpointError(
            f"no run at {cs.uri} (no checkpoints/ or {EVENTS_FILE}): check the URI"
        )
    return cs


def _events_exist(cs: CheckpointStore) -> bool:
    return bool(retry.call(retry.STORAGE_LIST, lambda: read_lines(cs.uri), op="read events", uri=cs.uri))


def _when(t: float, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return _dt.datetime.fromtimestamp(t).strftime(fmt) if t else "-"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def cmd_ls(uri: str, *, verify: bool = False, out: TextIO | None = None) -> int:
    """Table of checkpoints: step, time, world size, bytes, save seconds, status.

    verify=True reads every file to tell corrupt from committed (slow on big checkpoints).
    """
    out = out or sys.stdout

    def run() -> int:
        cs = _store_with_run(uri)
        infos = cs.list(verify=verify)
        # Saves that did not commit, as the run reported them (checkpoint_failed events).
        failed = {int(e["step"]): (e.get("time") or 0.0, str(e.get("reason") or "?"))
                  for e in read_events(cs.uri) if e.get("event") == Event.CHECKPOINT_FAILED and "step" in e}
        if not infos and not failed:
            print(retry.redact(f"no checkpoints under {cs.uri}"), file=out)
            return 0
        rows = [["STEP", "TIME", "WORLD", "BYTES", "SECONDS", "STATUS"]]
        by_step = {i.step: i for i in infos}
        for step in sorted(set(by_step) | set(failed)):
            i = by_step.get(step)
            if i is not None and (i.status == COMMITTED or step not in failed):
                rows.append([
                    str(i.step), _when(i.time), str(i.world_size or "-"), _size(i.bytes),
                    f"{i.seconds:.2f}" if i.seconds is not None else "-", i.status,
                ])  # fmt: skip
                continue
            when, reason = failed[step]
            rows.append([str(step), _when(when), "-", _size(i.bytes) if i else "-", "-",
                         f"failed: {retry.redact(reason.splitlines()[0])[:120]}"])
        _table(rows, out)
        return 0

    return _guard(run)


def _pick_step(cs: CheckpointStore, step: int | None) -> int:
    if step is not None:
        return step
    latest = cs.latest()
    if latest is None:
        raise NoCheckpointError(f"no committed checkpoint under {cs.uri}")
    return latest.step


def cmd_inspect(uri: str, step: int | None = None, *, out: TextIO | None = None) -> int:
    """Files, tensors (shape, dtype, which file holds each chunk) and values of one checkpoint."""
    out = out or sys.stdout

    def run() -> int:
        cs = _store_with_run(uri)
        s = _pick_step(cs, step)
        manifest, md = open_step(cs, s)
        print(retry.redact(f"checkpoint {cs.step_uri(s)}"), file=out)
        print(f"  step {manifest.step}, world size {manifest.world_size}, committed "
              f"{_when(manifest.time)}, {_size(manifest.bytes)}, saved in "
              f"{manifest.seconds:.2f}s", file=out)  # fmt: skip
        print("files:", file=out)
        rows = [["  NAME", "RANK", "BYTES", manifest.checksum.upper()]]
        for name, f in sorted(manifest.files.items()):
            rows.append([f"  {name}", str(f.rank), str(f.size), f"{f.checksum:08x}"])
        _table(rows, out)
        print("tensors:", file=out)
        rows = [["  NAME", "SHAPE", "DTYPE", "CHUNKS (offsets -> file)"]]
        for key, tmd in sorted(md.state_dict_metadata.items()):
            if not isinstance(tmd, TensorStorageMetadata):
                rows.append([f"  {key}", "-", "object", "-"])
                continue
            chunks = []
            for c in tmd.chunks:
                info = md.storage_data.get(MetadataIndex(key, c.offsets))
                where = info.relative_path if info is not None else "?"
                chunks.append(f"{list(c.offsets)}->{where}")
            dtype = str(tmd.properties.dtype).removeprefix("torch.")
            rows.append([f"  {key}", str(list(tmd.size)), dtype, ", ".join(chunks)])
        _table(rows, out)
        print("values:", file=out)
        for path, value in manifest.values:
            text = json.dumps(value)
            print(f"  {'.'.join(path)} = {text if len(text) <= 200 else text[:197] + '...'}",
                  file=out)  # fmt: skip
        return 0

    return _guard(run)


def cmd_verify(uri: str, step: int | None = None, *, out: TextIO | None = None) -> int:
    """Check sizes and checksums of one (or every) committed checkpoint; exit 1 naming bad files."""
    out = out or sys.stdout

    def run() -> int:
        cs = _store_with_run(uri)
        steps = [step] if step is not None else [i.step for i in cs.list() if i.status == COMMITTED]
        if not steps:
            raise NoCheckpointError(f"no committed checkpoint under {cs.uri}")
        bad = 0
        for s in steps:
            problems = cs.verify_committed(s) if step is None else cs.verify(s)
            for p in problems:
                print(retry.redact(f"corrupt: {p}"), file=out)
            print(f"step {s}: {'CORRUPT' if problems else 'ok'}", file=out)
            bad += bool(problems)
        if bad:
            print(f"error: {bad} of {len(steps)} checkpoint(s) failed verification (see above)",
                  file=sys.stderr)  # fmt: skip
            return 1
        return 0

    return _guard(run)


def cmd_export(uri: str, out_path: str, step: int | None = None, *,
               out: TextIO | None = None) -> int:  # fmt: skip
    """One torch.save file with the whole state of a checkpoint, whatever world size wrote it."""
    out = out or sys.stdout

    def run() -> int:
        cs = _store_with_run(uri)
        s = _pick_step(cs, step)
        full = cs.load_full(s)
        with fsspec.open(storage.normalize_uri(out_path), "wb") as f:
            torch.save(full, f)
        n = tree.count_tensors(full)
        print(retry.redact(f"exported step {s} ({n} tensors) from {cs.step_uri(s)} to {out_path}"), file=out)
        return 0

    return _guard(run)


def cmd_events(uri: str, as_json: bool = False, *, out: TextIO | None = None) -> int:
    """Print the run's event log: one line per event, or the raw JSON lines with as_json."""
    out = out or sys.stdout

    def run() -> int:
        open_location(uri)
        cs = CheckpointStore(uri)
        lines = retry.call(retry.STORAGE_READ, lambda: read_lines(cs.uri, partial=True), op="read", uri=f"{cs.uri}/{EVENTS_FILE}")
        if not lines:
            if cs.list():
                raise NoCheckpointError(f"no {EVENTS_FILE} at {cs.uri}: the run recorded no events")
            raise NoCheckpointError(f"no run at {cs.uri} (no checkpoints/ or {EVENTS_FILE}): check the URI")
        for line in lines:
            if as_json:
                print(line, file=out)
                continue
            docs = parse_lines(line + "\n")
            # A line that does not parse (torn while the run writes) is shown, marked, not guessed.
            print(format_event(docs[0]) if docs else f"?  {line}", file=out)
        return 0

    return _guard(run)
