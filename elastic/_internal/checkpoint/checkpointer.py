"""Checkpointer: the worker side of saving and loading, one per worker process.

save() is collective over the process group for its foreground part only: copy the tensors into
reused host buffers, agree on a plan (one all_gather of small plan objects). Everything after that
(writing shards, the commit, retention) is a SaveJob run by a SaveWriter on a background thread
(elastic._internal.checkpoint.save_job), talking through the Store, never the group, because the runtime may
destroy the group as soon as save() returns. A missing shard or cancel_pending() means no commit,
ever.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import torch.distributed as dist

from elastic._internal import tree
from elastic._internal.checkpoint.catalog import CheckpointStore
from elastic._internal.checkpoint.dcp_wire import decode_plan, encode_plan
from elastic._internal.checkpoint.dcp_write import storage_prefix
from elastic._internal.checkpoint.layout import CheckpointInfo
from elastic._internal.checkpoint.save_job import COORDINATOR, SaveJob, SaveWriter
from elastic._internal.checkpoint.shards import EntriesSavePlanner, Shards
from elastic._internal.checkpoint.state import split_state
from elastic._internal.collectives import CollectiveClock, Collectives
from elastic.config import CheckpointConfig, default
from elastic.errors import CheckpointError, ConfigError, StorageError, WorkerGroupError
from elastic._internal.hostbuf import HostBuffers
from elastic._internal.storage import RunLocation

log = logging.getLogger(__name__)
__all__ = ["Checkpointer", "as_collectives"]

_BUSY_ROUND_S = 0.05  # how often ranks waiting for a save in flight re-agree


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
        lease: (elastic._internal.lease.Lease, token) or (Lease, token, owner) of the run that owns `uri`: the
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
        self.async_save = async_save
        self.when_busy = when_busy
        self.buffers = HostBuffers()
        self.last_stall_s: float | None = None
        """Foreground seconds of the last save() (staging + planning), for benchmarks/events."""
        self._writer = SaveWriter(self.store, keep_last=keep_last, commit_timeout_s=commit_timeout_s, lease=lease)
        self._pending: SaveJob | None = None

    @property
    def keep_last(self) -> int:
        return self._writer.keep_last

    @property
    def commit_timeout_s(self) -> float:
        return self._writer.commit_timeout_s

    @property
    def lease(self) -> Any:
        """(Lease, token[, owner]) fencing the commits, or None."""
        return self._writer.lease

    @property
    def saving(self) -> bool:
        """True while a save is in flight on this rank (written or committed in the background)."""
        job = self._pending
        return job is not None and not job.done.is_set()

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
        pg = as_collectives(pg)
        if not self._wait_or_skip(pg, world_size):
            log.info("checkpoint at step %d skipped: the previous save is still in flight", step)
            if on_done is not None:
                on_done()
            return
        tensors, values = split_state(state)
        job = self._plan(self._stage(tensors, staged), step, rank, world_size, pg, t0)
        job.values, job.rendezvous = values, store if store is not None else dist.HashStore()
        job.on_commit, job.on_failure, job.ready, job.on_done = on_commit, on_failure, ready, on_done
        self.last_stall_s = time.monotonic() - t0
        self._start(job)

    def _stage(self, tensors: dict[str, Any], staged: bool) -> dict[str, Any]:
        """The tensors to write: host copies in reused buffers for an async save of live tensors.
        Sync saves write straight from the live tensors: save() blocks until the commit, so nothing
        can modify them meanwhile, and a host copy would only cost time and memory."""
        if staged or not self.async_save:
            return tensors
        if any(isinstance(v, Shards) for _, v in tree.leaves(tensors)):
            raise ConfigError("a state with Shards must be saved from staged host copies (staged=True)")
        return tree.build(self.buffers.copy_in(tree.tensor_leaves(tensors)))

    def _plan(self, tensors: dict[str, Any], step: int, rank: int, world_size: int, pg: Collectives | None,
              t0: float) -> SaveJob:
        """Collective: agree with every rank on the step, a save id and the global DCP plan."""
        planner = EntriesSavePlanner()
        planner.set_up_planner(tensors, storage_meta=None, is_coordinator=rank == COORDINATOR)
        local = planner.create_local_plan()
        gathered = self._gather({"plan": encode_plan(local), "nonce": uuid.uuid4().hex, "step": step},
                                pg, world_size, step)
        steps = {g["step"] for g in gathered}
        if steps != {step}:
            raise CheckpointError(f"ranks disagree on the checkpoint step: {sorted(steps)}")
        save_id = f"{step}-{gathered[0]['nonce']}"
        plans = [local if r == rank else decode_plan(g["plan"]) for r, g in enumerate(gathered)]
        global_plans, metadata = planner.create_global_plan(plans)
        plan = planner.finish_plan(storage_prefix(global_plans[rank], rank, save_id))
        return SaveJob(step, save_id, rank, world_size, started=time.time() - (time.monotonic() - t0),
                       plan=plan, planner=planner, metadata=metadata)

    def _start(self, job: SaveJob) -> None:
        """Run the job's background part: on a thread (async), or here, raising if it did not commit."""
        self._pending = job
        if self.async_save:
            job.thread = threading.Thread(target=self._writer.run, args=(job,), name=f"elastic-ckpt-{job.step}",
                                          daemon=True)
            job.thread.start()
            return
        self._writer.run(job)
        if isinstance(job.exc, StorageError):
            raise job.exc  # typed: StorageUnavailableError exits 2, TransientStorageError 1
        if job.info is None:
            raise CheckpointError(f"checkpoint at step {job.step} did not commit: {job.error or 'cancelled'}")

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

    def _gather(self, payload: Any, pg: Collectives | None, world_size: int, step: int) -> list[Any]:
        if world_size == 1:
            return [payload]
        try:
            assert pg is not None
            return pg.all_gather_json(payload)
        except Exception as exc:  # noqa: BLE001 - a peer died: the group is broken
            raise WorkerGroupError(
                f"checkpoint at step {step}: planning collective failed: {exc}"
            ) from exc

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
        self._writer.cancel(job)

    def _retain(self, newest: int) -> None:
        """Apply retention as of step `newest` (what a commit does after it; fenced by the lease)."""
        self._writer.retain(newest)

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
