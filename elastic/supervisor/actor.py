"""The supervisor as a Ray actor: hosts the rendezvous store, the event log and the controller.

Threaded (max_concurrency > 1) so that the driver can ask for progress while run() is in its loop.
The worker actors it creates are owned by it: if it dies, Ray stops them (fate sharing), so no
worker outlives its supervisor by more than Ray's owner-death detection.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any, Callable

import ray
import torch.distributed as dist

from elastic.checkpoint import CheckpointStore
from elastic.config import RunConfig
from elastic.events import Event, EventLog
from elastic.result import Result
from elastic.supervisor.controller import Controller
from elastic.supervisor.states import Failed
from elastic.supervisor.worker_group import RayWorkerGroup

log = logging.getLogger(__name__)


class SupervisorActor:
    def __init__(self, fn: Callable[[dict], Any], run: RunConfig, uri: str):
        self.run_config = run
        self.uri = uri
        self.events = EventLog(uri)
        host = ray.util.get_node_ip_address()
        # The store outlives every rank and every generation; each generation uses its own prefix.
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=run.failure.collective_timeout_s))
        backend = "nccl" if run.scaling.gpus_per_worker > 0 else "gloo"
        self.group = RayWorkerGroup(fn, run, uri)
        self.controller = Controller(run, self.group, self.events, (host, self.store.port), backend=backend)
        self._cursor = 0

    def run(self) -> Result:
        t0 = time.time()
        store = CheckpointStore(self.uri)
        removed = store.clean_partial()
        latest = store.latest()
        sc = self.run_config.scaling
        self.events.emit(Event.RUN_STARTED, name=self.run_config.name, uri=self.uri, supervisor_pid=os.getpid(),
                         supervisor_node_id=ray.get_runtime_context().get_node_id(), min_workers=sc.min_workers,
                         max_workers=sc.max_workers, resume_from_step=latest.step if latest else None,
                         cleaned_partial=removed)
        try:
            state = self.controller.run_to_end()
        except Exception as exc:  # noqa: BLE001 - the run must end with a result, not a hang
            log.exception("supervisor crashed")
            state = Failed(error=f"supervisor error: {type(exc).__name__}: {exc}", exit_code=1)
        finally:
            self.group.shutdown()
        ok = not isinstance(state, Failed)
        error = state.error if isinstance(state, Failed) else None
        exit_code = state.exit_code if isinstance(state, Failed) else 0
        c = self.controller
        self.events.emit(Event.RUN_FINISHED if ok else Event.RUN_FAILED, steps=c.progress.step, error=error,
                         seconds=round(time.time() - t0, 3), failures=c.failures, recoveries=len(c.recoveries))
        self.events.close()
        return Result(ok=ok, exit_code=exit_code, error=error, metrics=dict(c.progress.metrics),
                      steps=c.progress.step, seconds=time.time() - t0, failures=c.failures,
                      recoveries=list(c.recoveries), checkpoint=CheckpointStore(self.uri).latest(), uri=self.uri,
                      events=list(self.events.events))

    def close(self) -> None:
        """Stop the rendezvous store's server thread before the process exits."""
        self.group.shutdown()
        self.store = None

    def progress(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the progress snapshot, events recorded since the last call)."""
        evs = self.events.events[self._cursor:]
        self._cursor += len(evs)
        return vars(self.controller.progress).copy(), list(evs)


RemoteSupervisor = ray.remote(SupervisorActor)
