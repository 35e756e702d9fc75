"""The background part of one checkpoint save: write this rank's shards, publish them, and (on the
coordinator) commit, then apply retention.

A SaveJob runs on its own thread (Checkpointer.save() starts it) and talks to the other ranks through
the Store only, never the process group: the runtime may destroy the group as soon as save()
returns. Rank 0 coordinates: it commits (writes .metadata then manifest.json) only once every rank
has published a durable shard, then calls on_commit; retention runs after the job is done. A missing
shard or a cancel means no commit, ever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from elastic._internal import retry
from elastic._internal.checkpoint import commit
from elastic._internal.checkpoint.catalog import CheckpointStore
from elastic._internal.checkpoint.dcp_wire import decode_results, encode_results
from elastic._internal.checkpoint.dcp_write import metadata_bytes, write_shards
from elastic._internal.checkpoint.layout import CHECKSUM, COMMITTED, DCP_METADATA, CheckpointInfo, FileEntry, Manifest, checksum
from elastic.errors import CheckpointError, LeaseLostError

log = logging.getLogger(__name__)
COORDINATOR = 0


@dataclass
class SaveJob:
    """One save in flight on this rank: what save() planned for it, and how it ended."""

    step: int
    save_id: str
    rank: int
    world_size: int
    started: float
    """Wall-clock time the save began (its foreground part included)."""
    plan: Any = None
    planner: Any = None
    metadata: Any = None
    values: Any = None
    """The state's non-tensor values, recorded in the manifest."""
    rendezvous: dist.Store | None = None
    """Where ranks publish their shards and the coordinator its verdict (outlives the group)."""
    on_commit: Callable[[CheckpointInfo], None] | None = None
    on_failure: Callable[[int, str], None] | None = None
    ready: Callable[[], None] | None = None
    on_done: Callable[[], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    info: CheckpointInfo | None = None
    """What got committed (None: not, or not yet)."""
    retain: bool = False
    error: str | None = None
    """Why it did not commit (redacted), once done."""
    exc: BaseException | None = None
    thread: threading.Thread | None = None


class SaveWriter:
    """Writes and commits SaveJobs into one CheckpointStore, fenced by the run's lease."""

    def __init__(self, store: CheckpointStore, *, keep_last: int, commit_timeout_s: float, lease: Any = None):
        """lease: (elastic._internal.lease.Lease, token) or (Lease, token, owner), or None (unfenced)."""
        self.store = store
        self.keep_last = keep_last
        self.commit_timeout_s = commit_timeout_s
        self.lease = lease
        self._commit_lock = threading.Lock()
        """Makes cancel() and the commit mutually exclusive."""

    def run(self, job: SaveJob) -> None:
        """Write, publish and (coordinator) commit `job`; its outcome lands in the job, never raised."""
        try:
            if job.ready is not None:
                job.ready()
            self._write(job)
            if job.rank == COORDINATOR:
                self._coordinate(job)
            else:
                self._await_verdict(job)
        except commit.Cancelled:
            job.error = "cancelled"
            log.info("checkpoint at step %d cancelled before its commit", job.step)
        except Exception as exc:  # noqa: BLE001 - a failed save must not kill the worker
            self._failed(job, exc)
        finally:
            job.done.set()
            if job.on_done is not None:
                job.on_done()
        if job.retain:
            self.retain(job.step)

    def cancel(self, job: SaveJob) -> None:
        """Never commit `job`: once this returns no commit can start; one already writing finishes first."""
        with self._commit_lock:
            job.cancel.set()

    def _write(self, job: SaveJob) -> None:
        """Write this rank's shards and publish them (or the failure, so that no rank keeps waiting)."""
        cs, kv = self.store, job.rendezvous
        try:
            results, files = retry.call(
                retry.STORAGE_WRITE,
                lambda: write_shards(cs.fs, cs.step_path(job.step), job.plan, job.planner, job.rank),
                op="write shard", uri=cs.step_uri(job.step),
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - publish the failure so no rank keeps waiting
            reason = retry.redact(f"{type(exc).__name__}: {exc}")
            commit.publish(kv, job.save_id, f"rank{job.rank}", {"ok": False, "error": reason})
            if job.rank == COORDINATOR:
                # The other ranks wait for a verdict that only the coordinator gives.
                commit.publish(kv, job.save_id, "verdict",
                               {"committed": False, "reason": f"rank0 failed to write: {reason}"})
            raise
        commit.publish(kv, job.save_id, f"rank{job.rank}", {
            "ok": True,
            "files": {n: [f.size, f.checksum] for n, f in files.items()},
            "results": encode_results(results),
        })  # fmt: skip

    def _await_verdict(self, job: SaveJob) -> None:
        """A non-coordinator rank: what the coordinator decided."""
        commit.wait_keys(job.rendezvous, job.save_id, ["verdict"], timeout_s=self.commit_timeout_s,
                         cancel=job.cancel, what="commit verdict")  # fmt: skip
        verdict = commit.read(job.rendezvous, job.save_id, "verdict")
        if verdict.get("committed"):
            d = verdict["info"]
            job.info = CheckpointInfo(**{**d, "skipped": tuple(d.get("skipped", ())),
                                         "problems": tuple(d.get("problems", ()))})
        else:
            job.error = verdict.get("reason", "not committed")

    def _failed(self, job: SaveJob, exc: Exception) -> None:
        job.exc = exc
        job.error = retry.redact(f"{type(exc).__name__}: {exc}")
        log.warning("checkpoint at step %d failed: %s", job.step, job.error)
        if job.on_failure is not None:
            try:
                job.on_failure(job.step, job.error)
            except Exception:  # noqa: BLE001 - a callback bug must not hide the failure
                log.exception("on_failure callback failed for step %d", job.step)

    def _coordinate(self, job: SaveJob) -> None:
        """Rank 0: wait for every rank's durable shard, commit, and tell the others the verdict."""
        kv = job.rendezvous
        ranks = [f"rank{r}" for r in range(job.world_size)]
        try:
            commit.wait_keys(kv, job.save_id, ranks, timeout_s=self.commit_timeout_s,
                             cancel=job.cancel, what="durable shard")  # fmt: skip
            docs = [commit.read(kv, job.save_id, r) for r in ranks]
            failed = [f"{r}: {d.get('error')}" for r, d in zip(ranks, docs) if not d.get("ok")]
            if failed:
                raise CheckpointError("a rank failed to write its shard: " + "; ".join(failed))
            info = self._commit(job, docs)
        except BaseException as exc:
            reason = "cancelled" if isinstance(exc, commit.Cancelled) else str(exc)
            commit.publish(kv, job.save_id, "verdict", {"committed": False, "reason": reason})
            commit.cleanup(kv, job.save_id, ranks)
            raise
        commit.publish(kv, job.save_id, "verdict", {"committed": True, "info": info.__dict__})
        commit.cleanup(kv, job.save_id, ranks)
        job.info = info
        if job.on_commit is not None:
            try:
                job.on_commit(info)
            except Exception:  # noqa: BLE001 - a callback bug must not fail the save
                log.exception("on_commit callback failed for step %d", job.step)
        job.retain = True  # after the save is done: deleting old steps is not part of it

    def _commit(self, job: SaveJob, docs: list[dict[str, Any]]) -> CheckpointInfo:
        """Write .metadata, then the manifest (the commit), while the lease holds."""
        cs = self.store
        files: dict[str, FileEntry] = {}
        results = []
        for r, doc in enumerate(docs):
            files.update({n: FileEntry(int(s), int(c), r) for n, (s, c) in doc["files"].items()})
            results += decode_results(doc["results"])
        md = metadata_bytes(job.metadata, results, cs.step_uri(job.step), job.save_id)
        files[DCP_METADATA] = FileEntry(len(md), checksum(md, CHECKSUM), COORDINATOR)
        with self._commit_lock:
            if job.cancel.is_set():
                raise commit.Cancelled()
            self.fence(job.step)
            now = time.time()
            manifest = Manifest(
                step=job.step, world_size=job.world_size, time=now, seconds=now - job.started,
                save_id=job.save_id, files=files, values=list(job.values), checksum=CHECKSUM,
                lease=self.lease[1] if self.lease is not None else 0,
            )  # fmt: skip
            cs.commit(manifest, md, fence=lambda: self.fence(job.step))
        return CheckpointInfo(
            job.step, cs.step_uri(job.step), job.world_size, now, manifest.bytes, COMMITTED,
            seconds=manifest.seconds,
        )  # fmt: skip

    def fence(self, step: int) -> None:
        """LeaseLostError (one line, with the lease's reason) unless this run still owns the location."""
        if self.lease is None:
            return
        lease, token, *owner = self.lease
        why = lease.check(token, owner[0] if owner else "")
        if why is not None:
            raise LeaseLostError(f"checkpoint of step {step} not committed: {self.store.uri} is no longer owned by "
                                 f"this run: {why}")

    def retain(self, newest: int) -> None:
        """Delete committed steps past keep_last (fenced); a failure is logged, never raised."""
        try:
            fence = (lambda: self.fence(newest)) if self.lease is not None else None
            removed = self.store.retain(self.keep_last, newest, token=self.lease[1] if self.lease else 0,
                                        fence=fence)
            if removed:
                log.info("retention removed %s", ", ".join(removed))
        except Exception as exc:  # noqa: BLE001 - retention failing must not undo a commit
            log.warning("checkpoint retention failed: %s", retry.redact(str(exc)))
