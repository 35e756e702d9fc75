"""Per-process worker state that outlives process-group generations, and the thread that runs
the training function once per generation.

The training function runs in a thread (as in Ray Train) so that the actor keeps answering polls
and pause requests while it trains. A generation ends when the function returns (finished), when
every rank agreed to pause (parked, for a resize or preemption), when the group broke under it
(parked, a peer died or froze), or when user code raised (failed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from elastic.checkpoint import Checkpointer, CheckpointStore
from elastic.config import RunConfig
from elastic.errors import CheckpointCorruptError, CheckpointMismatchError, ElasticError, WorkerGroupError
from elastic.train_state import TrainState
from elastic.worker import context as ctx_mod
from elastic.worker import peer_sync
from elastic.worker.grad_sync import CollectiveClock
from elastic.worker.protocol import Assignment, WorkerPoll
from elastic.worker.seeding import reseed
from elastic.worker.snapshot import Snapshot

log = logging.getLogger(__name__)


def _looks_like_group_failure(exc: BaseException) -> bool:
    if isinstance(exc, (WorkerGroupError, dist.DistError)):
        return True
    text = str(exc)
    return any(s in text for s in ("Connection closed by peer", "Connection reset", "Timed out", "timed out",
                                   "Broken pipe", "Socket", "gloo", "NCCL", "connectFullMesh", "Connection refused"))


def _is_fatal(exc: BaseException) -> bool:
    """Errors a restart cannot fix: bad input, a checkpoint from another model, no checkpoint
    that verifies. Restarting on them would only burn the failure budget."""
    if isinstance(exc, (CheckpointMismatchError, CheckpointCorruptError)):
        return True
    return isinstance(exc, ElasticError) and exc.exit_code == 2


class WorkerRuntime:
    def __init__(self, fn: Callable[[dict], Any], run: RunConfig, uri: str):
        self.fn = fn
        self.run = run
        self.uri = uri
        self.seed = run.seed
        self.snapshot = Snapshot()
        self.clock = CollectiveClock()
        ck = run.checkpoint
        self.checkpointer = Checkpointer(uri, keep_last=ck.keep_last, async_save=ck.async_save, when_busy=ck.when_busy)
        self.catalog = CheckpointStore(uri)
        self.pause_requested = False
        self.preempt_requested = False
        self.state = "idle"
        self.generation = -1
        self.step = -1
        self.metrics: dict[str, float] = {}
        self.error: str | None = None
        self.fatal = False
        self.park_reason: str | None = None
        self._last_progress = time.monotonic()
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._assignment: Assignment | None = None
        self._ckpt_store: dist.Store | None = None

    # -- called from the actor's thread ---------------------------------------------------------
    def start(self, assignment: Assignment) -> None:
        if self._thread is not None and self._thread.is_alive():
            # The previous generation reports its outcome just before its thread ends: give that
            # thread a moment to finish instead of refusing the new assignment.
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():
                raise RuntimeError(f"generation {self.generation} is still running on this worker")
        self.pause_requested = False
        self.clock.broken = False
        self.park_reason = None
        self.generation = assignment.generation
        self.state = "running"
        self.error = None
        self._last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run_generation, args=(assignment,),
                                        name=f"elastic-gen{assignment.generation}", daemon=True)
        self._thread.start()

    def poll(self) -> WorkerPoll:
        with self._lock:
            events, self._events = self._events, []
        waiting = self.clock.waiting_since
        return WorkerPoll(
            state=self.state, generation=self.generation, step=self.step,
            progress_age_s=time.monotonic() - self._last_progress,
            waiting_in_collective_s=None if waiting is None else time.monotonic() - waiting,
            metrics=dict(self.metrics), events=events, error=self.error, fatal=self.fatal,
            preempted=self.preempt_requested, park_reason=self.park_reason,
        )

    def request_pause(self) -> None:
        self.pause_requested = True

    def request_preempt(self) -> None:
        if not self.preempt_requested:
            self.preempt_requested = True
            self.emit("preemption_notice", pid=os.getpid())

    # -- called from the training thread ---------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            self._events.append({"event": event, "time": time.time(), **fields})

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        self.clock.enter()
        try:
            yield
        except Exception:
            self.clock.broken = True
            raise
        finally:
            self.clock.leave()

    def latest_durable_step(self) -> int:
        info = self.catalog.latest()
        return -1 if info is None else info.step

    def checkpoint_due(self, step: int) -> bool:
        n = self.run.checkpoint.every_n_steps
        return n > 0 and step % n == 0

    def save_checkpoint(self, sd: dict, step: int, ctx: "ctx_mod.WorkerContext", *, wait: bool) -> None:
        assert self._assignment is not None and self._ckpt_store is not None
        with self.collective():
            self.checkpointer.save(sd, step=step, rank=ctx.rank, world_size=ctx.world_size,
                                   pg=ctx.process_group, store=self._ckpt_store,
                                   on_commit=self._on_commit)
        if wait:
            self.checkpointer.wait(timeout_s=self.run.failure.collective_timeout_s * 4)

    def _on_commit(self, info: Any) -> None:
        self.emit("checkpoint_committed", step=info.step, seconds=round(getattr(info, "seconds", 0.0) or 0.0, 4),
                  bytes=info.bytes, world_size=info.world_size, uri=info.uri)

    def on_step(self, step: int, metrics: dict[str, float] | None, *, merge: bool = False) -> None:
        self.step = step
        if metrics:
            new = {k: float(v) for k, v in metrics.items()}
            self.metrics = {**self.metrics, **new} if merge else new
        self._last_progress = time.monotonic()

    def on_restored(self, state: TrainState, source: str, lost_steps: int = 0) -> None:
        self.step = state.step
        self._last_progress = time.monotonic()
        self.emit("restored", step=state.step, source=source, generation=self.generation, lost_steps=lost_steps)

    # -- the generation thread ------------------------------------------------------------------
    def _run_generation(self, a: Assignment) -> None:
        self._assignment = a
        ctx: ctx_mod.WorkerContext | None = None
        outcome = "failed"
        try:
            timeout = timedelta(seconds=a.collective_timeout_s)
            base = dist.TCPStore(a.store_host, a.store_port, is_master=False, timeout=timeout)
            # A fresh key space per generation: a restarted rank never reads a stale peer address.
            pg_store = dist.PrefixStore(f"gen{a.generation}/pg", base)
            ckpt_base = dist.TCPStore(a.store_host, a.store_port, is_master=False, timeout=timeout)
            self._ckpt_store = dist.PrefixStore(f"gen{a.generation}/ckpt", ckpt_base)
            device = self._device()
            if dist.is_initialized():
                dist.destroy_process_group()
            dist.init_process_group(a.backend, store=pg_store, rank=a.rank, world_size=a.world_size, timeout=timeout)
            pg = dist.group.WORLD
            ctx = ctx_mod.WorkerContext(self, rank=a.rank, world_size=a.world_size, local_rank=a.local_rank,
                                        generation=a.generation, device=device, pg=pg)
            ctx_mod._set_current(ctx)
            if a.mode == "save":
                self._save_newest(ctx)
            else:
                reseed(self.seed, 0, 0)  # same model init on every rank and in every run
                self.fn(dict(self.run.train_loop_config))
                self._finish(ctx)
            outcome = "finished"
        except ctx_mod.PauseRequested:
            outcome = "parked"
            self.park_reason = "pause"
        except BaseException as exc:  # noqa: BLE001 - everything must be reported, nothing may escape
            if _is_fatal(exc):
                self.error, self.fatal = f"{type(exc).__name__}: {exc}", True
            elif self.clock.broken or _looks_like_group_failure(exc):
                outcome = "parked"
                self.park_reason = "broken"
                self.error = f"group broke: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                self.error = "".join(traceback.format_exception(exc)).strip()
        finally:
            if outcome != "finished":
                self.checkpointer.cancel_pending()
            if ctx is not None:
                ctx._release()
            ctx_mod._set_current(None)
            with contextlib.suppress(Exception):
                if dist.is_initialized():
                    dist.destroy_process_group()
            self.clock.leave()
            self.state = outcome

    def _finish(self, ctx: "ctx_mod.WorkerContext") -> None:
        """The function returned: the newest committed state must be durable before we report."""
        ctx._drain_vote()
        self._save_newest(ctx)

    def _save_newest(self, ctx: "ctx_mod.WorkerContext") -> None:
        """Make the newest state any rank holds durable (the run is ending, finished or not).

        Every decision here comes from values all ranks agreed on, so all take the same branch.
        """
        with self.collective():
            self.checkpointer.settle(ctx.process_group, ctx.world_size)
        with self.collective():
            agreed = peer_sync.agree(self.snapshot.step, self.latest_durable_step(), ctx.process_group,
                                     ctx._comm_device)
        if agreed.best <= agreed.durable:
            return
        with self.collective():
            sd, _ = peer_sync.newest_state(self.snapshot, agreed, ctx.process_group, ctx._comm_device)
        self.save_checkpoint(sd, agreed.best, ctx, wait=True)

    def _device(self) -> torch.device:
        if self.run.scaling.gpus_per_worker > 0 and torch.cuda.is_available():
            torch.cuda.set_device(0)
            return torch.device("cuda", 0)
        return torch.device("cpu")
