"""The storage side of the CLI: ls, inspect, verify, export, events.

Each command returns an exit code and prints human-readable text to stdout; a failure prints one
line on stderr starting with `error: ` and returns the error's exit code (2 for a wrong URI or
nothing to act on, 1 for a failed verification or storage error).
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

from elastic import retry, storage, tree
from elastic.checkpoint import CheckpointStore
from elastic.checkpoint.layout import COMMITTED
from elastic.errors import ElasticError, NoCheckpointError
from elastic.events import EVENTS_FILE, format_event, parse_lines


def _guard(fn: Callable[[], int], err: TextIO | None = None) -> int:
    try:
        return fn()
    except ElasticError as exc:
        print(f"error: {retry.redact(str(exc))}", file=err or sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {retry.redact(f'{type(exc).__name__}: {exc}')}", file=err or sys.stderr)
        return 1


def _store_with_run(uri: str) -> CheckpointStore:
    """The run's CheckpointStore; NoCheckpointError (exit 2) when nothing is there at all."""
    cs = CheckpointStore(uri)
    if cs.list():
        return cs
    if not _events_exist(cs):
        raise NoCheckpointError(
            f"no run at {cs.uri} (no checkpoints/ or {EVENTS_FILE}): check the URI"
        )
    return cs


def _events_exist(cs: CheckpointStore) -> bool:
    path = storage.join(cs.root, EVENTS_FILE)
    return bool(retry.call(retry.STORAGE_LIST, lambda: cs.fs.exists(path), op="stat", uri=cs.uri))


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
        if not infos:
            print(f"no checkpoints under {cs.uri}", file=out)
            return 0
        rows = [["STEP", "TIME", "WORLD", "BYTES", "SECONDS", "STATUS"]]
        for i in infos:
            rows.append([
                str(i.step), _when(i.time), str(i.world_size or "-"), _size(i.bytes),
                f"{i.seconds:.2f}" if i.seconds is not None else "-", i.status,
            ])  # fmt: skip
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
        manifest, md = cs._open(s)
        print(f"checkpoint {cs.step_uri(s)}", file=out)
        print(f"  step {manifest.step}, world size {manifest.world_size}, committed "
              f"{_when(manifest.time)}, {_size(manifest.bytes)}, saved in "
              f"{manifest.seconds:.2f}s", file=out)  # fmt: skip
        print("files:", file=out)
        rows = [["  NAME", "RANK", "BYTES", "CRC32"]]
        for name, f in sorted(manifest.files.items()):
            rows.append([f"  {name}", str(f.rank), str(f.size), f"{f.crc32:08x}"])
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
            problems = cs._verify_if_committed(s) if step is None else cs.verify(s)
            for p in problems:
                print(f"corrupt: {p}", file=out)
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
        print(f"exported step {s} ({n} tensors) from {cs.step_uri(s)} to {out_path}", file=out)
        return 0

    return _guard(run)


def cmd_events(uri: str, as_json: bool = False, *, out: TextIO | None = None) -> int:
    """Print URI/events.jsonl: one line per event, or the raw JSON lines with as_json."""
    out = out or sys.stdout

    def run() -> int:
        cs = CheckpointStore(uri)
        path = storage.join(cs.root, EVENTS_FILE)
        try:
            data = retry.call(retry.STORAGE_READ, lambda: cs.fs.cat_file(path), op="read",
                              uri=f"{cs.uri}/{EVENTS_FILE}")  # fmt: skip
        except FileNotFoundError:
            if cs.list():
                raise NoCheckpointError(
                    f"no {EVENTS_FILE} at {cs.uri}: the run recorded no events"
                ) from None
            raise NoCheckpointError(
                f"no run at {cs.uri} (no checkpoints/ or {EVENTS_FILE}): check the URI"
            ) from None
        for line in data.decode(errors="replace").splitlines():
            if not line.strip():
                continue
            if as_json:
                print(line, file=out)
                continue
            docs = parse_lines(line + "\n")
            # A line that does not parse (torn while the run writes) is shown, marked, not guessed.
            print(format_event(docs[0]) if docs else f"?  {line}", file=out)
        return 0

    return _guard(run)
