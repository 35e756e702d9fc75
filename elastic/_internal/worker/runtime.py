"""The worker process's runtime: takes assignments, runs the training function once per generation
in a thread, and answers the supervisor's polls.

The training function runs in a thread (as in Ray Train) so that the actor keeps answering polls
and pause requests while it trains. A generation ends when the function returns (finished), when
every rank agreed to pause (parked, for a resize or preemption), when the group broke under it
(parked, a peer died or froze), or when user code raised (failed).

Every generation of a worker runs in the same long-lived thread, not in a thread of its own: glibc
gives each new thread a malloc arena of its own, so a new thread's first step faults in its memory
afresh (at 2 ranks, 25 M parameters, on a VM whose memory was still untouched: the first step 1.4-1.9
s in a new thread against 0.9 s in the same one, same model, same group), and DTensor's sharding
cache misses for every op (a DeviceMesh compares equal only to one built on the same thread).
Together with heap.py this took a 4-rank recovery from 5.5 to 3.7 s (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from elastic.config import RunConfig
from elastic._internal.events import Event
from elastic import context as ctx_mod
from elastic.errors import exit_code_of
from elastic._internal.worker import failures, heap, priority, rehearsal
from elastic._internal.worker.devices import device_for, torch_env
from elastic._internal.worker.generation import Generation
from elastic._internal.worker.groups import ProcessGroups, connect
from elastic._internal.protocol import (Assignment, AssignmentMode, FailureKind, ParkReason, WorkerError, WorkerPoll,
                              WorkerState)
from elastic._internal.worker.seeding import reseed
from elastic._internal.worker.services import Services
from elastic._internal.worker.vote import PauseRequested

log = logging.getLogger(__name__)

GENERATION_HANDOFF_S = 10.0
"""A new assignment waits this long for the previous generation's thread, which reports its outcome
just before it ends; past that the assignment is refused (the supervisor then drops this worker)."""


@dataclass(frozen=True)
class _Rehearsal:
    """A standby's rehearsal of the job's optimizer step, queued for the generation thread."""

    layout: dict


class WorkerRuntime:
    def __init__(self, fn: Callable[[dict], Any], run: RunConfig, lease_token: int = 0):
        self.fn = fn
        self.run = run
        self.s = Services(run, lease_token=lease_token)
        self._notice_lock = threading.RLock()
        self._assignments: queue.SimpleQueue[Assignment | int | _Rehearsal] = queue.SimpleQueue()
        self._idle = threading.Event()
        """No generation is running: the generation thread waits for the next assignment."""
        self._idle.set()
        self._prefault_stop = threading.Event()
        """Set by the first assignment: a standby's heap prefault (fault_in_heap) gives way at once."""
        self._rehearsal_due = threading.Event()
        """A rehearsal is queued: the prefault gives way to it, and goes on after it."""
        self._gen_tid = 0
        threading.Thread(target=self._generations, name="elastic-gen", daemon=True).start()

    def fault_in_heap(self, nbytes: int) -> None:
        """While no assignment has come, fault in `nbytes` of the generation thread's heap at idle
        priority (a standby: its first step would otherwise take each page as a fault on the critical
        path of a recovery). On idle cycles only, so it never slows ranks it shares cores with."""
        self._assignments.put(nbytes)

    def rehearse(self, layout: dict) -> None:
        """While no assignment has come, rehearse the job's optimizer step on the generation thread
        (rehearsal.py). At normal priority: it holds the GIL most of its 0.1-0.3 s, and a thread at
        SCHED_IDLE preempted holding it would keep the actor from answering start() meanwhile."""
        # Set before the put: set after it, the generation thread could take the rehearsal (clearing
        # the flag) in between, and a flag left set with no rehearsal queued would make the prefault
        # give way and queue itself again forever. Set first, a prefault that gives way before the
        # put lands queues itself at most a few times more, until the rehearsal is ahead of it.
        self._rehearsal_due.set()
        self._assignments.put(_Rehearsal(layout))

    # -- called from the actor's thread ---------------------------------------------------------
    def start(self, assignment: Assignment) -> None:
        self._prefault_stop.set()
        if self._gen_tid:  # a prefault at idle priority ends its chunk at full speed
            priority.normal(self._gen_tid)
        if not self._idle.wait(timeout=GENERATION_HANDOFF_S):
            raise RuntimeError(f"generation {self.s.board.get().generation} is still running on this worker")
        self.s.pause.clear()
        self.s.clock.broken = False
        self.s.board.update(state=WorkerState.RUNNING, generation=assignment.generation, failure=None,
                            park_reason=None, last_progress=time.monotonic())
        # Cleared only with the assignment on its way: nothing between them can raise and leave the
        # thread idle but the worker refusing every later assignment.
        self._idle.clear()
        self._assignments.put(assignment)

    def poll(self, ack: tuple[int, int] = (0, 0)) -> WorkerPoll:
        """What this worker says; `ack`: the (event, record) sequence numbers the supervisor has."""
        st = self.s.board.get()
        unsent = self.s.board.unsent(*ack)
        waiting = self.s.clock.waiting_since
        now = time.monotonic()
        return WorkerPoll(
            state=st.state, generation=st.generation, step=st.step, progress_age_s=now - st.last_progress,
            waiting_in_collective_s=None if waiting is None else now - waiting, metrics=dict(st.metrics),
            events=unsent.events, failure=st.failure, preempted=self.s.notice.is_set(), park_reason=st.park_reason,
            records=unsent.records, event_seq=unsent.event_seq, record_seq=unsent.record_seq,
            committed_step=st.committed_step, restored=st.restored,
        )

    def request_pause(self) -> None:
        self.s.pause.set()

    def request_preempt(self) -> None:
        """A preemption notice: commit at the next agreed boundary and leave; this worker goes."""
        with self._notice_lock:  # the signal handler and the wakeup-fd reader may both call this
            if self.s.notice.is_set():
                return
            self.s.notice.set()
        self.s.leave.set()
        self.s.board.emit(Event.PREEMPTION_NOTICE, pid=os.getpid())

    def request_stop(self) -> None:
        """The driver is stopping the run: commit at the next agreed boundary and leave."""
        self.s.leave.set()

    # -- the generation thread ------------------------------------------------------------------
    def _generations(self) -> None:
        """The generation thread: runs each assignment in turn (why one thread: the module docstring)."""
        self._gen_tid = threading.get_native_id()
        while True:
            a = self._assignments.get()
            if isinstance(a, (int, _Rehearsal)):
                self._while_idle(a)
                continue
            threading.current_thread().name = f"elastic-gen{a.generation}"
            # Thread-local state the last generation may have left set, as a fresh thread would have
            # it (context managers restore theirs; a bare set_grad_enabled(False) does not).
            torch.set_grad_enabled(True)
            try:
                self._run_generation(a)
            except BaseException:  # noqa: BLE001 - it reports its own outcome; the thread must live on
                log.exception("generation %d ended outside its own report", a.generation)
            finally:
                self._idle.set()

    def _while_idle(self, a: int | _Rehearsal) -> None:
        """A standby's preparation, on the generation thread, given up once an assignment came."""
        stop = self._prefault_stop
        if isinstance(a, _Rehearsal):
            self._rehearsal_due.clear()
            if not stop.is_set():
                try:
                    nbytes = rehearsal.rehearse(a.layout)
                    self.s.rehearsed = nbytes is not None or self.s.rehearsed
                    heap.freeze_objects()  # what the rehearsal imported and left (DTensor's cache)
                    if nbytes and self.run.failure.buddy_shm:
                        self._stock_slots(nbytes)  # may fail (no room in /dev/shm): after the freeze
                except Exception:  # noqa: BLE001 - a lost head start, never a lost worker
                    log.debug("rehearsal failed", exc_info=True)
            return
        due = self._rehearsal_due
        with priority.background_priority(not stop.is_set(), max_idle_s=priority.PREFAULT_IDLE_S) as low:
            if low:  # only while idle: raised (by start() or the cap), it would compete with the ranks
                heap.prefault(a, lambda: not stop.is_set() and not due.is_set() and priority.lowered())
        if due.is_set() and not stop.is_set():
            # The rehearsal first (it takes 0.1-0.3 s and a newcomer's first step 0.4 s less; the
            # prefault can take its 10 s): then the prefault again, its pages so far already resident.
            self._assignments.put(a)

    def _stock_slots(self, nbytes: int) -> None:
        """The buddy slots of a rank of the rehearsed layout, made ahead at idle priority
        (host_slots.SlotWriter.stock): a newcomer's first two commits no longer fault them in."""
        stop = self._prefault_stop
        with priority.background_priority(not stop.is_set(), max_idle_s=priority.PREFAULT_IDLE_S) as low:
            if low:
                self.s.buddy.slots.stock(nbytes, go_on=lambda: not stop.is_set() and priority.lowered())

    def _run_generation(self, a: Assignment) -> None:
        s = self.s
        groups: ProcessGroups | None = None
        gen: Generation | None = None
        state, park, failure = WorkerState.FAILED, None, None
        try:
            device = self._device(a)
            # torch's view of this rank, as torchrun would give it, refreshed every generation.
            os.environ.update(torch_env(a.rank, a.world_size, a.local_rank, a.local_world_size))
            groups = connect(a, s.clock, abort=s.pause)
            gen = Generation(groups, device, s, local_rank=a.local_rank, local_world_size=a.local_world_size,
                             node_id=a.node_id)
            ctx_mod.set_context(ctx_mod.WorkerContext(gen))
            if a.mode is AssignmentMode.SAVE:
                gen.save_newest()
            else:
                reseed(s.seed, 0, 0)  # same model init on every rank and in every run
                self.fn(dict(self.run.train_loop_config))
                gen.finish()
            state = WorkerState.FINISHED
        except PauseRequested:
            state, park = WorkerState.PARKED, ParkReason.PAUSE
        except BaseException as exc:  # noqa: BLE001 - everything must be reported, nothing may escape
            state, park, failure = self._failed(exc)
        finally:
            if state is not WorkerState.FINISHED:
                s.checkpointer.cancel_pending()
            if groups is not None and park is ParkReason.BROKEN:
                # First: release whatever still waits on a peer that is gone, here (our buddy
                # exchange, which release() waits for) and in the peers blocked on us. A peer's
                # release() waiting for its buddy exchange with us while we wait for ours with it
                # would otherwise hold both until the collective timeout.
                with contextlib.suppress(Exception):
                    groups.abort()
            if gen is not None:
                gen.release(broken=park is ParkReason.BROKEN, keep=park is not None)
            ctx_mod.set_context(None)
            if groups is not None:
                with contextlib.suppress(Exception):
                    groups.destroy()
            s.clock.leave()
            s.board.update(state=state, park_reason=park, failure=failure)

    def _failed(self, exc: BaseException) -> tuple[WorkerState, ParkReason | None, WorkerError]:
        """How a generation that raised `exc` ends: parked when its group broke, else failed."""
        kind = failures.classify(exc, group_broken=self.s.clock.broken)
        if kind is FailureKind.GROUP:
            first = str(exc).splitlines()[0] if str(exc) else ""
            return WorkerState.PARKED, ParkReason.BROKEN, WorkerError(kind, f"group broke: {type(exc).__name__}: {first}")
        if kind is FailureKind.FATAL:
            failure = WorkerError(kind, f"{type(exc).__name__}: {exc}", exit_code=exit_code_of(exc))
        else:
            failure = WorkerError(kind, "".join(traceback.format_exception(exc)).strip(),
                                  signature=failures.signature(exc, step=self.s.board.get().step + 1))
        return WorkerState.FAILED, None, failure

    def _device(self, a: Assignment) -> torch.device:
        gpus = self.run.scaling.gpus_per_worker
        if gpus <= 0:
            return torch.device("cpu")
        if a.gpu_ids is None:
            raise RuntimeError("this worker's GPU reservation was not placed in time: it cannot train")
        if a.gpu_ids:
            # A promoted standby: its GPUs were reserved by another actor, and CUDA is not initialized
            # in this process yet (the warm-up is CPU only), so it can still choose what it sees.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(a.gpu_ids)
            device = device_for(gpus, a.gpu_ids)
        else:
            import ray  # only here: the worker side runs without Ray too (scripts/gpu_check.py)

            device = device_for(gpus, ray.get_gpu_ids())
        torch.cuda.set_device(device)
        return device
