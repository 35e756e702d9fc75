"""The Ray actor that hosts one rank. Its process, imported modules and memory survive every
rebuild of the process group; only the supervisor decides when it goes away."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import ray

from elastic.config import RunConfig
from elastic._internal.worker.priority import background_priority
from elastic._internal.protocol import Assignment, WorkerInfo, WorkerPoll

if TYPE_CHECKING:
    from elastic._internal.worker.runtime import WorkerRuntime


FN_FETCH_TIMEOUT_S = 60.0
ORPHAN_TIMEOUT_S = 15.0
"""A worker that hears nothing from its supervisor (polls, heartbeats) for this long exits: its
supervisor and driver are gone, perhaps with the Ray node that would have told it."""


def _unbox(boxed: bytes | ray.ObjectRef) -> Callable[[dict], Any]:
    """The training function: its pickled bytes (what RayWorkerGroup sends), or a reference to it
    (bounded: a supervisor that died meanwhile must fail this start, not park it)."""
    if isinstance(boxed, bytes):
        from ray import cloudpickle

        return cloudpickle.loads(boxed)
    return ray.get(boxed, timeout=FN_FETCH_TIMEOUT_S)


class WorkerActor:
    def __init__(self, fn_box: list[bytes | ray.ObjectRef], run: RunConfig, background: bool = False,
                 lease_token: int = 0):
        # A worker started while others train (a spare, a replacement that joins later) pays its
        # start-up (torch import, warm-up: seconds of CPU) at idle priority, so that it does not
        # slow the training ranks it shares cores with. This module imports no torch for that
        # reason, and the training function comes boxed, pickled (RayWorkerGroup): unpickling it
        # imports the user's module, and with it torch, inside the block.
        with background_priority(background) as lowered:
            from elastic._internal.worker.heap import freeze_objects, keep_freed_memory
            from elastic._internal.worker.runtime import WorkerRuntime

            fn: Callable[[dict], Any] = _unbox(fn_box[0])
            self._rt: WorkerRuntime = WorkerRuntime(fn, run, lease_token)
            # A spot VM gets SIGTERM before it is reclaimed: turn it into a graceful leave at the next
            # step boundary instead of dying mid-step.
            _on_sigterm(self._rt.request_preempt)
            kept = keep_freed_memory()  # a rebuild reuses what the last generation freed (heap.py)
            _warm_up()
            freeze_objects()  # after the warm-up's own objects are gone
        self._background = lowered
        if lowered and kept:  # after the block: its end sets every thread back to normal priority
            from elastic._internal.worker.heap import PREFAULT_BYTES

            self._rt.fault_in_heap(PREFAULT_BYTES)
        self._heard = time.monotonic()
        threading.Thread(target=self._watch_supervisor, name="elastic-orphan-watch", daemon=True).start()

    def info(self) -> WorkerInfo:
        ctx = ray.get_runtime_context()
        return WorkerInfo(pid=os.getpid(), node_id=ctx.get_node_id(), ip=ray.util.get_node_ip_address(),
                          background_startup=self._background)

    def start(self, assignment: Assignment) -> None:
        self._rt.start(assignment)

    def layout(self) -> dict | None:
        """The running generation's optimizer over its sharded parameters, for a standby to
        rehearse (rehearsal.describe); None if there is none."""
        return self._rt.s.layout

    def rehearse(self, layout: dict | None) -> None:
        """A standby: rehearse this optimizer step before any assignment comes (rehearsal.py)."""
        if layout:
            self._rt.rehearse(layout)

    def poll(self, ack: tuple[int, int] = (0, 0)) -> WorkerPoll:
        self._heard = time.monotonic()
        return self._rt.poll(ack)

    def watch(self, version: int, step: int, timeout_s: float, ack: tuple[int, int] = (0, 0)) -> tuple[int, WorkerPoll]:
        """A long poll: answers when something changed since (version, step), or after timeout_s.
        The supervisor keeps one outstanding per worker: news arrive when they happen, a death
        fails the call at once (Ray tells the caller), and a frozen worker is one that stops
        answering."""
        self._heard = time.monotonic()
        version = self._rt.s.board.wait_change(version, step, timeout_s)
        self._heard = time.monotonic()
        return version, self._rt.poll(ack)

    def heartbeat(self) -> None:
        self._heard = time.monotonic()

    def request_pause(self) -> None:
        self._rt.request_pause()

    def request_preempt(self) -> None:
        self._rt.request_preempt()

    def request_stop(self) -> None:
        self._rt.request_stop()

    def _watch_supervisor(self) -> None:
        while True:
            time.sleep(1.0)
            if time.monotonic() - self._heard > ORPHAN_TIMEOUT_S:
                # Nothing may outlive the run: not this process, nor a checkpoint it would commit
                # (the lease fences that too). No Ray call: Ray may be gone with the driver.
                os._exit(1)


def _on_sigterm(action: Callable[[], None]) -> None:
    """Run `action` when SIGTERM arrives. Ray's task loop lets the main thread run Python signal
    handlers promptly even in a threaded actor (measured: notice within 0.5 s of the signal,
    tests/test_recovery.py), so a plain handler does. __init__ runs on the main thread."""
    try:
        signal.signal(signal.SIGTERM, lambda *_: action())
    except ValueError:  # not the main thread (a test hosting the actor class in-process)
        pass


def _warm_up() -> None:
    """Pay torch's first-use costs (thread pools, autograd, optimizer, gloo, DCP imports) now, while
    this actor is a spare or not yet needed, rather than inside a recovery."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint  # noqa: F401 - imported for its cost
    from torch.nn.parallel import DistributedDataParallel  # noqa: F401

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    store = dist.HashStore()
    pg = dist.ProcessGroupGloo(store, 0, 1)
    pg.allreduce([torch.zeros(1)]).wait()


RemoteWorker = ray.remote(WorkerActor)
