"""Checkpointer: the worker side of saving and loading, one per worker process.

save() is collective over the process group for its foreground part only: copy the tensors into
reused host buffers, agree on a plan (one all_gather of small plan objects). Everything after that
(writing shards, the commit) runs on a background thread and talks through the Store, never the
group, because the runtime may destroy the group as soon as save() returns. Rank 0 coordinates:
it commits (writes .metadata then manifest.json) only once every rank has published a durable
shard, then applies retention, then calls on_commit. A missing shard or cancel_pending() means no
commit, ever.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from elastic import retry, tree
from elastic.checkpoint import commit, dcp_io
from elastic.checkpoint.catalog import CheckpointStore
from elastic.checkpoint.layout import (
    CHECKSUM, COMMITTED, DCP_METADATA, CheckpointInfo, FileEntry, Manifest, checksum,
)  # fmt: skip
from elastic.checkpoint.shards import EntriesSavePlanner, Shards
from elastic.checkpoint.state import split_state
from elastic.collectives import CollectiveClock, Collectives
from elastic.config import CheckpointConfig, default
from elastic.errors import CheckpointError, ConfigError, LeaseLostError, StorageError, WorkerGroupError
from elastic.hostbuf import HostBuffers
from elastic.storage import RunLocation

log = logging.getLogger(__name__)
COORDINATOR = 0


_BUSY_ROUND_S = 0.05  # how often ranks waiting for a save in flight re-agree


@dataclass
class _Save:
    """One save in flight on this rank."""

    step: int
    save_id: str
    rank: int
    world_size: int
    started: float
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    info: CheckpointInfo | None = None
    retain: bool = False
    error: str | None = None
    exc: BaseException | None = None
    thread: threading.Thread | None = None


class Checkpointer:
    """Saves and loads one worker's state under URI/checkpoints; lives across group generations."""

    def __init__(
        self,
        where: str | RunLocation | CheckpointStore,
        *,
        keep_last: int = default(CheckpointConfig, "keep_last"),
        async_save: bool = default(CheckpointConfig, "async_save"),
        when_busy: Literal["wait", "skip"] = default(CheckpointConfig, "when_busy"),
        commit_timeout_s: float = default(CheckpointConfig, "commit_timeout_s"),
        fs: Any = None,
        lease: Any = None,
    ) -> None:
        """
        where: the run's location, its URI, or the process's CheckpointStore of it (then shared:
            one store per process).
        The options mean what CheckpointConfig's fields of the same names say, and are validated
        there (ConfigError).
        keep_last: committed checkpoints to keep (older ones are deleted after each commit);
            0 keeps all.
        async_save: write in the background; save() returns once tensors are copied to host.
        when_busy: a save is due while the previous one is still in flight: "wait" for it, or
            "skip" this one (decided collectively: all ranks skip together).
        commit_timeout_s: how long the coordinator waits for every rank's shard (and other ranks
            for the verdict) before abandoning the save.
        fs: a filesystem object replacing the location's (fault injection in tests; not with a store).
        lease: (elastic.lease.Lease, token) or (Lease, token, owner) of the run that owns `uri`: the
            coordinator commits only while the lease holds (Lease.check), records the token in the
            manifest, never replaces a manifest of a newer token, and fences retention the same way.
        """
        CheckpointConfig(keep_last=keep_last, async_save=async_save, when_busy=when_busy,
                         commit_timeout_s=commit_timeout_s)  # validates them
        if isinstance(where, CheckpointStore):
            if fs is not None:
                raise ConfigError("pass fs= to the CheckpointStore, not to a Checkpointer built on it")
            self.store = where
        else:
            self.store = CheckpointStore(where, fs=fs)
        self.keep_last = keep_last
        self.async_save = async_save
        self.when_busy = when_busy
        self.commit_timeout_s = commit_timeout_s
        self.buffers = HostBuffers()
        self.lease = lease
        self.last_stall_s: float | None = None
        """Foreground seconds of the last save() (staging + planning), for benchmarks/events."""
        self._pending: _Save | None = None
        self._commit_lock = threading.Lock()

    # -- saving ---------------------------------------------------------------------------
    def save(
        self,
        state: dict[str, Any],
        *,
        step: int,
        rank: int,
        world_size: int,
        pg: Any,
        store: dist.Store | None,
        on_commit: Callable[[CheckpointInfo], None] | None = None,
        on_failure: Callable[[int, str], None] | None = None,
        staged: bool = False,
        ready: Callable[[], None] | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Checkpoint `state` at `step`; collective over `pg` (all ranks, same step and keys): the
        runtime's control plane (a Collectives) or any process group object.

        Async: returns once the tensors are copied (or at once when skipped as busy). Sync:
        returns after the commit; raises CheckpointError if the save did not commit.
        `on_commit(info)` is called on the coordinator (rank 0) after the commit and retention;
        `on_failure(step, reason)` when the save did not commit: on the coordinator, and on any rank
        whose own write failed (not for a cancel: the group broke, which is reported elsewhere).
        staged: `state`'s tensors are host copies nobody modifies until `on_done()` (the snapshot's
        buffers): written as they are, no second copy. `ready()` is called before any byte is
        written (the copy into them may still be running); `on_done()` when the save ends, whatever
        its outcome.
        pg may be None (and store None) for a single process (world_size 1).
        """
        t0 = time.monotonic()
        if world_size > 1 and (pg is None or store is None):
            raise ConfigError("save() with world_size > 1 needs the process group and the store")
        if store is None:
            store = dist.HashStore()
        pg = as_collectives(pg)
        if not self._wait_or_skip(pg, world_size):
            log.info("checkpoint at step %d skipped: the previous save is still in flight", step)
            if on_done is not None:
                on_done()
            return
        tensors, values = split_state(state)
        # Sync saves write straight from the live tensors: save() blocks until the commit, so
        # nothing can modify them meanwhile, and a host copy would only cost time and memory.
        if not staged and self.async_save:
            if any(isinstance(v, Shards) for _, v in tree.leaves(tensors)):
                raise ConfigError("a state with Shards must be saved from staged host copies (staged=True)")
            tensors = tree.build(self.buffers.copy_in(tree.tensor_leaves(tensors)))
        planner = EntriesSavePlanner()
        planner.set_up_planner(tensors, storage_meta=None, is_coordinator=rank == COORDINATOR)
        local = planner.create_local_plan()
        gathered = self._gather({"plan": dcp_io.encode_plan(local), "nonce": uuid.uuid4().hex, "step": step},
                                pg, world_size, step)
        steps = {g["step"] for g in gathered}
        if steps != {step}:
            raise CheckpointError(f"ranks disagree on the checkpoint step: {sorted(steps)}")
        save_id = f"{step}-{gathered[0]['nonce']}"
        plans = [local if r == rank else dcp_io.decode_plan(g["plan"]) for r, g in enumerate(gathered)]
        global_plans, metadata = planner.create_global_plan(plans)
        plan = planner.finish_plan(dcp_io.storage_prefix(global_plans[rank], rank, save_id))
        job = _Save(step, save_id, rank, world_size, started=time.time() - (time.monotonic() - t0))
        args = (job, plan, planner, metadata, values, store, on_commit, on_failure, ready, on_done)
        self.last_stall_s = time.monotonic() - t0
        self._pending = job
        if self.async_save:
            job.thread = threading.Thread(
                target=self._run, args=args, name=f"elastic-ckpt-{step}", daemon=True
            )
            job.thread.start()
            return
        self._run(*args)
        if isinstance(job.exc, StorageError):
            raise job.exc  # typed: StorageUnavailableError exits 2, TransientStorageError 1
        if job.info is None:
            raise CheckpointError(
                f"checkpoint at step {step} did not commit: {job.error or 'cancelled'}"
            )

    def settle(self, pg: Any, world_size: int) -> None:
        """Collective: wait, together with every rank, until no rank has a save in flight."""
        self._wait_or_skip(as_collectives(pg), world_size, skip=False)

    def _wait_or_skip(self, pg: Collectives, world_size: int, *, skip: bool | None = None) -> bool:
        """Wait for the save in flight, or agree with all ranks to skip (False).

        Ranks wait together, in short agreed rounds: a rank waiting for its own slow write while
        a peer already sits in the next planning collective would let that collective time out
        and break the group. Each round is one tiny allreduce, so no collective waits long.
        """
        deadline = time.monotonic() + self.commit_timeout_s
        while True:
            job = self._pending
            mine = job is not None and not job.done.is_set()
            busy = mine
            if world_size > 1:
                try:
                    busy = bool(pg.allreduce_max([1 if mine else 0])[0])
                except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError subclasses
                    raise WorkerGroupError(f"checkpoint busy check failed: {exc}") from exc
            if not busy:
                return True
            if (self.when_busy == "skip") if skip is None else skip:
                return False
            if time.monotonic() >= deadline:
                raise CheckpointError(
                    f"the previous checkpoint did not finish within {self.commit_timeout_s:g}s: "
                    "storage is too slow for the checkpoint interval"
                )
            if mine and job is not None:
                job.done.wait(_BUSY_ROUND_S)
            else:
                time.sleep(_BUSY_ROUND_S)

    def _gather(self, payload: Any, pg: Collectives, world_size: int, step: int) -> list[Any]:
        if world_size == 1:
            return [payload]
        try:
            return pg.all_gather_json(payload)
        except Exception as exc:  # noqa: BLE001 - a peer died: the group is broken
            raise WorkerGroupError(
                f"checkpoint at step {step}: planning collective failed: {exc}"
            ) from exc

    def _run(
        self, job: _Save, plan: Any, planner: Any, metadata: Any, values: Any, store: dist.Store,
        on_commit: Callable[[CheckpointInfo], None] | None, on_failure: Callable[[int, str], None] | None,
        ready: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """Background part: write this rank's shards, publish, and (coordinator) commit."""
        cs = self.store
        try:
            if ready is not None:
                ready()
            try:
                results, files = retry.call(
                    retry.STORAGE_WRITE,
                    lambda: dcp_io.write_shards(cs.fs, cs.step_path(job.step), plan, planner,
                                                job.rank),  # fmt: skip
                    op="write shard", uri=cs.step_uri(job.step),
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - publish the failure so no rank keeps waiting
                reason = retry.redact(f"{type(exc).__name__}: {exc}")
                commit.publish(store, job.save_id, f"rank{job.rank}", {"ok": False, "error": reason})
                if job.rank == COORDINATOR:
                    # The other ranks wait for a verdict that only the coordinator gives.
                    commit.publish(store, job.save_id, "verdict",
                                   {"committed": False, "reason": f"rank0 failed to write: {reason}"})
                raise
            commit.publish(store, job.save_id, f"rank{job.rank}", {
                "ok": True,
                "files": {n: [f.size, f.checksum] for n, f in files.items()},
                "results": dcp_io.encode_results(results),
            })  # fmt: skip
            if job.rank == COORDINATOR:
                self._coordinate(job, metadata, values, store, on_commit)
            else:
                commit.wait_keys(store, job.save_id, ["verdict"], timeout_s=self.commit_timeout_s,
                                 cancel=job.cancel, what="commit verdict")  # fmt: skip
                verdict = commit.read(store, job.save_id, "verdict")
                if verdict.get("committed"):
                    d = verdict["info"]
                    job.info = CheckpointInfo(**{**d, "skipped": tuple(d.get("skipped", ())),
                                                 "problems": tuple(d.get("problems", ()))})
                else:
                    job.error = verdict.get("reason", "not committed")
        except commit.Cancelled:
            job.error = "cancelled"
            log.info("checkpoint at step %d cancelled before its commit", job.step)
        except Exception as exc:  # noqa: BLE001 - a failed save must not kill the worker
            job.exc = exc
            job.error = retry.redact(f"{type(exc).__name__}: {exc}")
            log.warning("checkpoint at step %d failed: %s", job.step, job.error)
            if on_failure is not None:
                try:
                    on_failure(job.step, job.error)
                except Exception:  # noqa: BLE001 - a callback bug must not hide the failure
                    log.exception("on_failure callback failed for step %d", job.step)
        finally:
            job.done.set()
            if on_done is not None:
                on_done()
        if job.retain:
            self._retain(job.step)

    def _retain(self, newest: int) -> None:
        try:
            fence = (lambda: self._fence(newest)) if self.lease is not None else None
            removed = self.store.retain(self.keep_last, newest, token=self.lease[1] if self.lease else 0,
                                        fence=fence)
            if removed:
                log.info("retention removed %s", ", ".join(removed))
        except Exception as exc:  # noqa: BLE001 - retention failing must not undo a commit
            log.warning("checkpoint retention failed: %s", retry.redact(str(exc)))

    def _coordinate(
        self, job: _Save, metadata: Any, values: Any, store: dist.Store,
        on_commit: Callable[[CheckpointInfo], None] | None,
    ) -> None:  # fmt: skip
        ranks = [f"rank{r}" for r in range(job.world_size)]
        try:
            commit.wait_keys(store, job.save_id, ranks, timeout_s=self.commit_timeout_s,
                             cancel=job.cancel, what="durable shard")  # fmt: skip
            docs = [commit.read(store, job.save_id, r) for r in ranks]
            failed = [f"{r}: {d.get('error')}" for r, d in zip(ranks, docs) if not d.get("ok")]
            if failed:
                raise CheckpointError("a rank failed to write its shard: " + "; ".join(failed))
            info = self._commit(job, metadata, values, docs)
        except BaseException as exc:
            reason = "cancelled" if isinstance(exc, commit.Cancelled) else str(exc)
            commit.publish(store, job.save_id, "verdict", {"committed": False, "reason": reason})
            commit.cleanup(store, job.save_id, ranks)
            raise
        commit.publish(store, job.save_id, "verdict", {"committed": True, "info": info.__dict__})
        commit.cleanup(store, job.save_id, ranks)
        job.info = info
        if on_commit is not None:
            try:
                on_commit(info)
            except Exception:  # noqa: BLE001 - a callback bug must not fail the save
                log.exception("on_commit callback failed for step %d", job.step)
        job.retain = True  # after the save is done: deleting old steps is not part of it

    def _commit(
        self, job: _Save, metadata: Any, values: Any, docs: list[dict[str, Any]]
    ) -> CheckpointInfo:
        cs = self.store
        files: dict[str, FileEntry] = {}
        results = []
        for r, doc in enumerate(docs):
            files.update({n: FileEntry(int(s), int(c), r) for n, (s, c) in doc["files"].items()})
            results += dcp_io.decode_results(doc["results"])
        md = dcp_io.metadata_bytes(metadata, results, cs.step_uri(job.step), job.save_id)
        files[DCP_METADATA] = FileEntry(len(md), checksum(md, CHECKSUM), COORDINATOR)
        # The lock makes cancel_pending() and the commit mutually exclusive: once cancel returns,
        # no commit can start; a commit already writing finishes first.
        with self._commit_lock:
            if job.cancel.is_set():
                raise commit.Cancelled()
            self._fence(job.step)
            now = time.time()
            manifest = Manifest(
                step=job.step, world_size=job.world_size, time=now, seconds=now - job.started,
                save_id=job.save_id, files=files, values=list(values), checksum=CHECKSUM,
                lease=self.lease[1] if self.lease is not None else 0,
            )  # fmt: skip
            cs.commit(manifest, md, fence=lambda: self._fence(job.step))
        return CheckpointInfo(
            job.step, cs.step_uri(job.step), job.world_size, now, manifest.bytes, COMMITTED,
            seconds=manifest.seconds,
        )  # fmt: skip

    def _fence(self, step: int) -> None:
        """LeaseLostError (one line, with the lease's reason) unless this run still owns the location."""
        if self.lease is None:
            return
        lease, token, *owner = self.lease
        why = lease.check(token, owner[0] if owner else "")
        if why is not None:
            raise LeaseLostError(f"checkpoint of step {step} not committed: {self.store.uri} is no longer owned by "
                                 f"this run: {why}")

    def wait(self, timeout_s: float | None = None) -> CheckpointInfo | None:
        """Block until the save in flight is committed, failed or cancelled; what got committed.

        None when nothing committed (no save, failure, cancel) or `timeout_s` passed first.
        """
        job = self._pending
        if job is None:
            return None
        if not job.done.wait(timeout_s):
            return None
        return job.info

    def cancel_pending(self) -> None:
        """The group broke: stop waiting for peers and never commit the save in flight."""
        job = self._pending
        if job is None or job.done.is_set():
            return
        with self._commit_lock:
            job.cancel.set()

    @property
    def last_error(self) -> str | None:
        """Why the last save did not commit (None if it did or is still running)."""
        job = self._pending
        return job.error if job is not None and job.done.is_set() else None

    # -- loading --------------------------------------------------------------------------
    def load(
        self, state: dict[str, Any], *, step: int | None = None, fallback: bool | None = None
    ) -> CheckpointInfo | None:
        """Load `state` in place from the newest committed checkpoint that verifies (or `step`).

        With `step`, a corrupt checkpoint raises CheckpointCorruptError unless fallback=True,
        which tries older committed steps (info.step then says which one loaded, and
        info.skipped which were passed over).
        Works at any world size (DDP replicas each read everything). None when there is no
        committed checkpoint. CheckpointMismatchError when the state does not fit the checkpoint.
        """
        return self.store.load_into(state, step=step, fallback=fallback)


def as_collectives(pg: Any) -> Any:
    """The control-plane view of `pg`: a Collectives as is, a process group wrapped (None stays
    None: a single process)."""
    if pg is None or isinstance(pg, Collectives):
        return pg
    return Collectives(pg, CollectiveClock())
