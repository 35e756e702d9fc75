"""CheckpointStore: list, verify, clean, retain and load the checkpoints under a run's URI.

Needs no process group: the supervisor and the CLI use it directly, and Checkpointer uses it for
loading and for the coordinator's commit. A step directory is committed iff its manifest.json
parses; anything else is partial and is never listed as committed nor loaded.

This module holds listing, verifying and committing; deleting under the lease is in
elastic._internal.checkpoint.retention and loading in elastic._internal.checkpoint.loading (the store's methods for
them delegate there).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import fsspec

from elastic._internal import retry, storage
from elastic._internal.checkpoint import dcp_read, loading, retention
from elastic._internal.checkpoint.layout import (
    CHECKPOINTS_DIR, COMMITTED, CORRUPT, DCP_METADATA, MANIFEST, PARTIAL, CheckpointInfo,
    Manifest, hasher, parse_step_dirname, step_dirname,
)  # fmt: skip
from elastic.errors import CheckpointCorruptError, LeaseLostError, NoCheckpointError

log = logging.getLogger(__name__)
_CHUNK = 8 << 20


def _checksum_file(fs: fsspec.AbstractFileSystem, path: str, algo: str) -> tuple[int, int]:
    """(size, checksum) of a whole file, read in chunks."""
    def run() -> tuple[int, int]:
        h, size = hasher(algo), 0
        with fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        return size, int(h.intdigest())

    return retry.call(retry.STORAGE_READ, run, op="read", uri=path)


class CheckpointStore:
    """The checkpoints of one run (URI/checkpoints/step_*)."""

    def __init__(self, where: str | storage.RunLocation, *, fs: fsspec.AbstractFileSystem | None = None) -> None:
        """`where`: the run's location or its URI. `fs` replaces the location's filesystem (tests
        pass a fault-injecting one)."""
        self.location = storage.RunLocation.of(where)
        self.uri = self.location.uri
        self.fs = fs if fs is not None else self.location.fs
        self.root = self.location.root
        self.dir = storage.join(self.root, CHECKPOINTS_DIR)

    # -- naming ---------------------------------------------------------------------------
    def step_path(self, step: int) -> str:
        return storage.join(self.dir, step_dirname(step))

    def step_uri(self, step: int) -> str:
        return f"{self.uri}/{CHECKPOINTS_DIR}/{step_dirname(step)}"

    # -- reading --------------------------------------------------------------------------
    def _ls(self, path: str) -> list[dict[str, Any]]:
        def ls() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(path)  # s3fs caches listings; other ranks wrote meanwhile
            try:
                return list(self.fs.ls(path, detail=True))
            except FileNotFoundError as exc:
                if retry.is_permanent(exc):  # no bucket: not an empty run, a wrong URI
                    raise
                return []

        return retry.call(retry.STORAGE_LIST, ls, op="list", uri=self.uri)

    def _step_dirs(self) -> list[tuple[int, str]]:
        out = []
        for entry in self._ls(self.dir):
            step = parse_step_dirname(entry["name"])
            if step is not None and entry.get("type") == "directory":
                out.append((step, entry["name"].rstrip("/")))
        return sorted(out)

    def read_manifest(self, step: int) -> Manifest | None:
        """The step's manifest; None when there is none (partial); CheckpointCorruptError if torn.
        """
        path = storage.join(self.step_path(step), MANIFEST)
        try:
            data = retry.call(retry.STORAGE_READ, lambda: self.fs.cat_file(path), op="read manifest", uri=self.uri)
        except FileNotFoundError:
            return None
        return Manifest.from_json(data, self.step_uri(step))

    def _info(self, step: int, files: list[dict[str, Any]]) -> CheckpointInfo:
        names = {f["name"].rstrip("/").rsplit("/", 1)[-1] for f in files}
        manifest = None
        if MANIFEST in names:
            try:
                manifest = self.read_manifest(step)
            except CheckpointCorruptError as exc:
                log.warning("%s", exc)
        if manifest is None:
            size = sum(int(f.get("size") or 0) for f in files if f.get("type") == "file")
            return CheckpointInfo(step, self.step_uri(step), 0, 0.0, size, PARTIAL)
        return CheckpointInfo(
            step, self.step_uri(step), manifest.world_size, manifest.time, manifest.bytes,
            COMMITTED, seconds=manifest.seconds,
        )  # fmt: skip

    def list(self, *, verify: bool = False) -> list[CheckpointInfo]:
        """Every step directory, oldest first; with verify=True, bad committed ones are corrupt."""
        infos = []
        for step, path in self._step_dirs():
            info = self._info(step, self._ls(path))
            if verify and info.status == COMMITTED:
                problems = self.verify(step)
                if problems:
                    info = dataclasses.replace(info, status=CORRUPT, problems=tuple(problems))
            infos.append(info)
        return infos

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint (not verified: load() verifies what it reads)."""
        committed = [i for i in self.list() if i.status == COMMITTED]
        return committed[-1] if committed else None

    def latest_verified(self) -> CheckpointInfo | None:
        """The newest committed checkpoint whose manifest and DCP metadata verify and whose files all
        have their recorded sizes (a quick check: shards' checksums are read only when loading).
        Decisions that rely on "the newest durable state" use this one."""
        for step, path in reversed(self._step_dirs()):
            files = self._ls(path)
            info = self._info(step, files)
            if info.status == COMMITTED and not self.quick_problems(step, files):
                return info
        return None

    def quick_problems(self, step: int, files: list[dict[str, Any]] | None = None) -> list[str]:
        """What a quick check of a committed step finds: the manifest parses, .metadata matches its
        checksum, every file exists with its recorded size. [] when all is well."""
        try:
            manifest = self.read_manifest(step)
        except CheckpointCorruptError as exc:
            return [str(exc)]
        if manifest is None:
            return [f"{self.step_uri(step)}: not committed"]
        listed = {f["name"].rstrip("/").rsplit("/", 1)[-1]: int(f.get("size") or 0)
                  for f in (files if files is not None else self._ls(self.step_path(step)))}
        problems = [f"{self.step_uri(step)}/{name}: {'missing' if name not in listed else 'wrong size'}"
                    for name, entry in sorted(manifest.files.items()) if listed.get(name) != entry.size]
        if not problems:
            try:
                dcp_read.read_verified(self.fs, self.step_path(step), DCP_METADATA, manifest.files, self.step_uri(step),
                                       manifest.checksum)
            except CheckpointCorruptError as exc:
                problems.append(str(exc))
        return problems

    def verify(self, step: int | None = None) -> list[str]:
        """Problems of one committed step (or of every committed step): [] when all is well.

        Each problem names the file (URL) and what is wrong: missing, short, checksum mismatch.
        """
        if step is None:
            return [p for s, _ in self._step_dirs() for p in self.verify_committed(s)]
        manifest = self.read_manifest(step)
        if manifest is None:
            raise NoCheckpointError(f"no committed checkpoint at {self.step_uri(step)}")
        problems = []
        listed = {
            f["name"].rstrip("/").rsplit("/", 1)[-1]: int(f.get("size") or 0)
            for f in self._ls(self.step_path(step))
        }
        for name, entry in sorted(manifest.files.items()):
            where = f"{self.step_uri(step)}/{name}"
            if name not in listed:
                problems.append(f"{where}: missing")
            elif listed[name] != entry.size:
                problems.append(f"{where}: {listed[name]} bytes, manifest says {entry.size}")
            else:
                try:
                    _, got = _checksum_file(self.fs, storage.join(self.step_path(step), name), manifest.checksum)
                except FileNotFoundError:
                    problems.append(f"{where}: missing")
                    continue
                if got != entry.checksum:
                    problems.append(
                        f"{where}: checksum mismatch ({manifest.checksum} {got:08x}, manifest {entry.checksum:08x})"
                    )
        return problems

    def verify_committed(self, step: int) -> list[str]:
        """Problems of `step` if it is committed (a torn manifest is one); [] when all is well or when
        it is not committed (a partial step is no checkpoint to verify)."""
        try:
            return self.verify(step)
        except NoCheckpointError:
            return []
        except CheckpointCorruptError as exc:
            return [str(exc)]

    # -- cleaning (elastic._internal.checkpoint.retention) -------------------------------------------
    def clean_partial(self, *, token: int = 0, fence: Callable[[], None] | None = None) -> list[str]:
        """Delete uncommitted step directories; the URLs removed.

        Call it only when no save is in flight (at start-up, or between saves on the coordinator).
        `fence` (raises when this run lost the location) is called before each deletion, and a
        step that got a manifest meanwhile is kept.
        """
        return retention.clean_partial(self, token=token, fence=fence)

    def retain(self, keep_last: int, newest: int, *, token: int = 0,
               fence: Callable[[], None] | None = None) -> list[str]:
        """After committing `newest`: drop committed steps beyond the newest `keep_last` and
        partial ones older than `newest` (abandoned saves). keep_last <= 0 keeps everything.
        Fenced like clean_partial(); a manifest of a newer lease than `token` is never removed."""
        return retention.retain(self, keep_last, newest, token=token, fence=fence)

    # -- commit (coordinator) -------------------------------------------------------------
    def uncommit(self, step: int, *, token: int = 0) -> None:
        """Remove a manifest before rewriting its step (a re-save after falling back past it);
        LeaseLostError if it was committed under a newer lease than `token` (never removed)."""
        path = storage.join(self.step_path(step), MANIFEST)
        try:
            existing = self.read_manifest(step)
        except CheckpointCorruptError:
            existing = None  # torn: nobody's commit
        if existing is not None and existing.lease > token:
            raise LeaseLostError(
                f"{self.step_uri(step)} was committed by a newer owner of {self.uri} (lease {existing.lease}, "
                f"this run's is {token}): it is not overwritten")

        def rm() -> None:
            if self.fs.exists(path):
                self.fs.rm(path)

        retry.call(retry.STORAGE_WRITE, rm, op="uncommit", uri=self.step_uri(step))

    def commit(self, manifest: Manifest, metadata: bytes, *, fence: Callable[[], None] | None = None) -> None:
        """Commit a step whose shards are durable: its DCP .metadata, then its manifest, created
        only if none exists (conditionally, on the store's atomic create). `fence` raises when this
        run lost the location; it runs before anything is touched and again right before the
        manifest. A manifest of a newer lease is never removed nor replaced (LeaseLostError)."""
        step, token = manifest.step, manifest.lease
        if fence is not None:
            fence()
        self.uncommit(step, token=token)
        self.write_file(step, DCP_METADATA, metadata, atomic=False)  # vouched for by the manifest
        if fence is not None:
            fence()
        path = storage.join(self.step_path(step), MANIFEST)
        data = manifest.to_json()
        if retry.call(retry.STORAGE_WRITE, lambda: storage.create_bytes(self.fs, path, data), op="commit",
                      uri=self.step_uri(step)):
            return
        try:
            existing = self.read_manifest(step)
        except CheckpointCorruptError:
            existing = None
        if existing is not None and existing.save_id == manifest.save_id:
            return  # a retried create whose first try had succeeded
        raise LeaseLostError(
            f"{self.step_uri(step)} was committed meanwhile by another save "
            f"(lease {existing.lease if existing else '?'}, this run's is {token}): not overwritten")

    def write_file(self, step: int, name: str, data: bytes, *, atomic: bool = True) -> None:
        """Write a whole file of `step`: atomic (readers see all or nothing; its directory entry
        durable) for the manifest, the commit; plain (fsynced) for what the manifest vouches for."""
        path = storage.join(self.step_path(step), name)
        write = storage.write_bytes if atomic else storage.write_durable
        retry.call(
            retry.STORAGE_WRITE, lambda: write(self.fs, path, data), op="write",
            uri=f"{self.step_uri(step)}/{name}",
        )  # fmt: skip

    # -- loading (elastic._internal.checkpoint.loading) -----------------------------------------------
    def load_into(
        self, state: dict[str, Any], step: int | None = None, *, fallback: bool | None = None
    ) -> CheckpointInfo | None:
        """Load `state` in place from the newest committed step that verifies (or from `step`).

        fallback (default: only when no step is given): on a missing or corrupt file, log a
        warning and try the next older committed step (at or below `step`); `skipped` in the
        result lists the steps passed over. None when there is no committed checkpoint at all.
        """
        return loading.load_into(self, state, step, fallback=fallback)

    def load_full(self, step: int | None = None) -> dict[str, Any]:
        """The whole state of `step` (default: newest committed) as one nested dict.

        World-size independent (shards are merged); verified like load(); no fallback.
        """
        return loading.load_full(self, step)
