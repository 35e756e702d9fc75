"""The supervisor as a Ray actor: hosts the rendezvous store, the event log and the controller.

Threaded (max_concurrency > 1) so that the driver can ask for progress, or ask it to stop, while
run() is in its loop. The worker actors it creates are owned by it: if it dies, Ray stops them
(fate sharing). Because Ray may die with the driver (a local cluster), it does not rely on that
alone: it watches the driver's process and ends the run when the driver is gone, and it heartbeats
every worker, which exits on its own when the heartbeats stop (elastic._internal.worker.actor).

The rendezvous store listens on this node's address only, and every key lives under a secret
prefix that reaches the workers through Ray (token-authenticated), never through the store.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from datetime import timedelta
from typing import Any, Callable

import ray
import torch.distributed as dist

from elastic._internal.checkpoint import CheckpointStore
from elastic.config import RunConfig
from elastic._internal.events import Event, EventLog
from elastic._internal.metrics import MetricsLog
from elastic.errors import ConfigError, LeaseLostError, exit_code_of
from elastic._internal.lease import Lease, LeaseRecord, pid_alive
from elastic.result import Result
from elastic._internal.retry import redact
from elastic._internal.supervisor.controller import Controller
from elastic._internal.supervisor.states import Failed, Stopped
from elastic._internal.supervisor.tracking import Progress
from elastic._internal.supervisor.worker_group import RayWorkerGroup
from elastic._internal.worker.devices import backend_for

log = logging.getLogger(__name__)

HEARTBEAT_EVERY_S = 2.0
"""How often every worker hears from its supervisor (well within the workers' orphan timeout)."""
DRIVER_CHECK_EVERY_S = 0.5
"""How often the supervisor checks that its driver process still lives."""


def new_store_prefix() -> str:
    """128 random bits: a run's key space on the rendezvous store nobody can guess."""
    return secrets.token_hex(16) + "/"


def bind_store(host: str, timeout_s: float) -> tuple[dist.TCPStore, socket.socket]:
    """A TCPStore server listening on `host` only (torch's own listens on every interface)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    store = dist.TCPStore(host, sock.getsockname()[1], is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s), master_listen_fd=sock.fileno(), use_libuv=True)
    return store, sock


class SupervisorActor:
    def __init__(self, fn: Callable[[dict], Any], run: RunConfig, owner: LeaseRecord | None = None):
        """`run.location` is where the run lives; `owner` the lease the driver took on it."""
        if run.location is None:
            raise ConfigError("the supervisor needs the run's location: set RunConfig.location or checkpoint.uri")
        self.run_config = run
        self.location = run.location
        self.owner = owner
        self.checkpoints = CheckpointStore(self.location)
        self.events = EventLog(self.location)
        self.metrics = MetricsLog(self.location)
        host = ray.util.get_node_ip_address()
        # The store outlives every rank and every generation; each generation uses its own prefix
        # under the run's secret one.
        self.store, self._listener = bind_store(host, run.failure.collective_timeout_s)
        backend = backend_for(run.scaling.gpus_per_worker, run.scaling.backend)
        self.group = RayWorkerGroup(fn, run, lease_token=owner.token if owner else 0)
        self.controller = Controller(run, self.group, self.events, (host, self.store.port), backend=backend,
                                     store_prefix=new_store_prefix(), metrics=self.metrics)
        self._cursor = 0
        self._metrics_cursor = 0
        self._done = threading.Event()
        threading.Thread(target=self._keepalive, name="elastic-heartbeat", daemon=True).start()

    def _fence(self) -> Callable[[], None] | None:
        """Raises when this run no longer holds its location (checked before each deletion)."""
        if self.owner is None:
            return None
        lease, token, owner = Lease(self.location), self.owner.token, self.owner.owner

        def fence() -> None:
            reason = lease.check(token, owner)
            if reason is not None:
                raise LeaseLostError(reason)

        return fence

    def run(self) -> Result:
        t0 = time.time()
        c = self.controller
        state: Any
        try:
            if self.owner is not None:
                threading.Thread(target=self._watch_driver, name="elastic-driver-watch", daemon=True).start()
            store = self.checkpoints
            removed = store.clean_partial(token=self.owner.token if self.owner else 0, fence=self._fence())
            latest = store.latest_verified()
            c.committed_step = latest.step if latest else -1
            c.storage_step = lambda: getattr(store.latest_verified(), "step", -1)
            sc = self.run_config.scaling
            self.events.emit(Event.RUN_STARTED, name=self.run_config.name, uri=self.location.shown,
                             supervisor_pid=os.getpid(), supervisor_node_id=ray.get_runtime_context().get_node_id(),
                             min_workers=sc.min_workers, max_workers=sc.max_workers,
                             resume_from_step=latest.step if latest else None, cleaned_partial=removed)
            state = c.run_to_end()
        except Exception as exc:  # noqa: BLE001 - the run must end with a result, not a hang
            log.exception("supervisor error")
            state = Failed(error=redact(f"{type(exc).__name__}: {exc}"), exit_code=exit_code_of(exc))
        finally:
            self._done.set()
            self.group.shutdown()
        ok = not isinstance(state, (Failed, Stopped))
        stopped = isinstance(state, Stopped)
        error = state.error if isinstance(state, Failed) else state.message if stopped else None
        exit_code = state.exit_code if isinstance(state, (Failed, Stopped)) else 0
        if not stopped:
            self.events.emit(Event.RUN_FINISHED if ok else Event.RUN_FAILED, steps=c.progress.step, error=error,
                             seconds=round(time.time() - t0, 3), failures=c.failures, recoveries=len(c.recoveries),
                             lost_s=c.progress.lost_s,
                             ettr=None if c.progress.ettr is None else round(c.progress.ettr, 4))
        self.events.close()
        self.metrics.close()
        try:
            checkpoint = self.checkpoints.latest_verified()
        except Exception:  # noqa: BLE001 - the result must reach the driver whatever storage does
            checkpoint = None
        return Result(ok=ok, exit_code=exit_code, error=error, metrics=dict(c.progress.metrics),
                      steps=c.progress.step, seconds=time.time() - t0, failures=c.failures,
                      recoveries=[r.as_dict() for r in c.recoveries], checkpoint=checkpoint, uri=self.location.uri,
                      events=list(self.events.events), stopped=stopped, ettr=c.progress.ettr, lost_s=c.progress.lost_s)

    def request_stop(self, signum: int) -> None:
        """The driver got SIGINT/SIGTERM: commit the newest state within stop_timeout_s, then end."""
        if self.controller.stop_signal is None:
            self.controller.stop_signal = signum

    def abort(self, reason: str) -> None:
        """End the run at once (its location was taken over by another run)."""
        self.controller.abort_reason = reason

    def close(self) -> None:
        """Stop the rendezvous store's server thread before the process exits."""
        self._done.set()
        self.group.shutdown()
        self.store = None

    def progress(self) -> tuple[Progress, list[dict[str, Any]], list[dict[str, Any]]]:
        """(the progress snapshot, events recorded since the last call, per-step metrics records
        since the last call)."""
        evs = self.events.since(self._cursor)
        self._cursor = self.events.count
        recs = self.metrics.since(self._metrics_cursor)
        self._metrics_cursor = self.metrics.count
        return self.controller.progress, evs, recs  # frozen: the controller replaces it as a whole

    def _keepalive(self) -> None:
        while not self._done.wait(HEARTBEAT_EVERY_S):
            try:
                self.group.heartbeat()
            except Exception:  # noqa: BLE001 - a dead actor's handle: the controller deals with it
                pass

    def _watch_driver(self) -> None:
        """The driver runs on this node (the supervisor is pinned there): if its process is gone,
        nobody will ever read this run's result, and Ray may be gone too. End everything now."""
        assert self.owner is not None
        while not self._done.wait(DRIVER_CHECK_EVERY_S):
            if not pid_alive(self.owner.pid, self.owner.pid_start):
                log.warning("the driver (pid %d) is gone: stopping the run", self.owner.pid)
                try:
                    self.group.shutdown()
                finally:
                    os._exit(1)


RemoteSupervisor = ray.remote(SupervisorActor)
