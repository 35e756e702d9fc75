"""The supervisor's control loop: `while not state.is_terminal(): state = transition(state)`.

The controller carries out what the policy decides (policy.py, decisions.py) and decides nothing
itself. One handler per state asks the policy and carries out its decision through collaborators,
each with one job: the roster (who is in the group, roster.py), the ledger (what the workers said,
committed steps, failures, recoveries, goodput: ledger.py), the supply (requests, newcomers,
standbys: supply.py), the formation of a group (formation.py) and the ending of a run that does not
finish (ending.py). The worker group behind it owns the actors. Clock and sleep are injected so
that unit tests step it without real time passing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Callable, Protocol

from elastic.config import RunConfig
from elastic._internal.events import Event
from elastic._internal.supervisor import policy as pol
from elastic._internal.supervisor.decisions import (Build, Continue, Fail, Finish, Policy, Resize, ResizeReason, Restart,
                                          Retry)
from elastic._internal.supervisor.ending import Ending
from elastic._internal.supervisor.formation import Formation
from elastic._internal.supervisor.ledger import Ledger
from elastic._internal.supervisor.roster import Roster
from elastic._internal.supervisor.states import (Failed, Finished, Resizing, Restarting, Running, Starting, State,
                                       StateType, Stopping)
from elastic._internal.supervisor.supply import Supply
from elastic._internal.supervisor.worker_group import WorkerGroup

log = logging.getLogger(__name__)


class EventSink(Protocol):
    def emit(self, event: Event | str, **fields: Any) -> dict[str, Any]: ...
    def record(self, record: dict[str, Any]) -> None: ...


class MetricsSink(Protocol):
    def extend(self, records: list[dict[str, Any]]) -> None: ...


class _Kept:
    """A controller attribute that one of its collaborators keeps (read and written through)."""

    def __init__(self, part: str, name: str):
        self.part, self.name = part, name

    def __get__(self, ctl: Any, owner: type | None = None) -> Any:
        return self if ctl is None else getattr(getattr(ctl, self.part), self.name)

    def __set__(self, ctl: Any, value: Any) -> None:
        setattr(getattr(ctl, self.part), self.name, value)


class Controller:
    members = _Kept("roster", "members")
    """Worker ids in rank order."""
    generation = _Kept("roster", "generation")
    failures = _Kept("ledger", "failures")
    consecutive_failures = _Kept("ledger", "consecutive_failures")
    recoveries = _Kept("ledger", "recoveries")
    progress = _Kept("ledger", "progress")
    """The progress snapshot (frozen; the driver reads it from another thread)."""
    committed_step = _Kept("ledger", "committed_step")
    """The newest step a checkpoint of this run committed."""
    newest_step = _Kept("ledger", "newest_step")
    storage_step = _Kept("ledger", "storage_step")
    """The newest step committed on storage (-1: none), read when a stop ends the run."""
    _incidents = _Kept("ledger", "incidents")
    _first_step_at = _Kept("ledger", "first_step_at")
    _gpu_ids = _Kept("formation", "gpu_ids")

    def __init__(self, run: RunConfig, group: WorkerGroup, events: EventSink, store_addr: tuple[str, int], *,
                 backend: str = "gloo", store_prefix: str = "", clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, metrics: MetricsSink | None = None):
        self.run = run if run.policy is not None else replace(run, policy=pol.DefaultPolicy())
        """The run's config, with the policy the controller asks (DefaultPolicy when it named none)."""
        self.metrics = metrics
        self.group = group
        self.events = events
        self.store_addr = store_addr
        self.store_prefix = store_prefix
        self.backend = backend
        self.clock = clock
        self.sleep = sleep
        self.stop_signal: int | None = None
        """Set (from another thread) when the driver got SIGINT/SIGTERM: commit and end."""
        self.abort_reason: str | None = None
        """Set (from another thread) when the run must end at once (its location was taken over)."""
        self.roster = Roster(self)
        self.ledger = Ledger(self, clock)
        self.supply = Supply(self)
        self.formation = Formation(self)
        self.ending = Ending(self)

    # -- loop --------------------------------------------------------------------------------
    def run_to_end(self) -> State:
        state: State = Starting()
        while not state.is_terminal():
            state = self.transition(state)
        return state

    def transition(self, state: State) -> State:
        if self.abort_reason is not None and not state.is_terminal():
            self.group.shutdown()
            return Failed(error=self.abort_reason, exit_code=1)
        if self.stop_signal is not None and state.type is StateType.RUNNING:
            state = Stopping(signal=self.stop_signal)
        handler = {
            StateType.STARTING: self._starting,
            StateType.RUNNING: self._running,
            StateType.RESTARTING: self._restarting,
            StateType.RESIZING: self._resizing,
            StateType.STOPPING: self.ending.stop,
        }[state.type]
        nxt = handler(state)
        if nxt.type is not state.type:
            self.ledger.show(state=nxt.type.label)
            log.info("supervisor: %s -> %s", state.type.label, nxt.type.label)
        return nxt

    @property
    def policy(self) -> Policy:
        """The run's policy: held in one place, self.run."""
        assert self.run.policy is not None
        return self.run.policy

    def poll(self, wids: list[int], timeout_s: float) -> dict[int, pol.Poll]:
        """Poll these workers and take in what they said (every poll of the controller's goes here)."""
        polls = self.group.poll(wids, timeout_s)
        self._absorb(polls)
        return polls

    def _absorb(self, polls: dict[int, pol.Poll]) -> None:
        self.ledger.absorb(polls)

    # -- STARTING ----------------------------------------------------------------------------
    def _starting(self, _state: State) -> State:
        sc = self.run.scaling
        assert sc.max_workers is not None
        placeable = self.group.placeable()
        self.group.request(sc.max_workers + sc.spares)
        t0 = self.clock()
        while True:
            if self.stop_signal is not None:
                return self.ending.stopped(self.stop_signal, started=t0)
            self.group.refresh()
            ready = self.group.ready()
            d = self.policy.start(self.run, pol.StartView(ready=len(ready), placeable=placeable,
                                                          waited_s=self.clock() - t0))
            if isinstance(d, Fail):
                return self.ending.fail(d)
            if isinstance(d, Build):
                return self.formation.build(ready[: sc.max_workers], reason="start")
            self.sleep(self.run.failure.poll_interval_s)

    # -- RUNNING -----------------------------------------------------------------------------
    def _running(self, state: Running) -> State:
        self.group.refresh()
        polls = self.poll(self.members, self.run.failure.poll_timeout_s)
        h = pol.classify(polls, self.run.failure)
        grow_due = self.supply.grow_due()
        crowded = tuple(w for w in self.members if w in self.supply.crowded)
        view = pol.RunningView(members=tuple(self.members), newcomers=len(self.supply.newcomers(limit=1)),
                               grow_due=grow_due, crowded=crowded)
        d = self.policy.running(self.run, h, view)
        if grow_due:
            self.supply.grow_checked()
        if isinstance(d, Fail):
            return self.ending.fail(d)
        if isinstance(d, Finish):
            self.ledger.close_incidents(finished=True)
            return Finished()
        if isinstance(d, Restart):
            rank_of = self.roster.rank_of
            self.events.emit(Event.GROUP_FAILED, generation=self.generation, reason=d.reason,
                             errors={rank_of[w]: e.strip().splitlines()[-1] for w, e in h.errors.items() if e})
            return Restarting(reason=d.reason, failed_workers=d.lost, since=self.clock())
        if isinstance(d, Resize):
            reason = ResizeReason(d.reason)  # a policy written before the enum gives its value
            if reason in (ResizeReason.GROW, ResizeReason.SPREAD):
                self.group.request_pause(self.members)
            return Resizing(reason=reason, leaving_workers=d.leaving, since=self.clock())
        assert isinstance(d, Continue)
        self.roster.watch_drains()
        self.supply.top_up(background=True)
        if self.supply.standbys_due():
            self.supply.keep_standbys()
        self.sleep(self.run.failure.poll_interval_s)
        return state

    # -- RESTARTING --------------------------------------------------------------------------
    def _restarting(self, state: Restarting) -> State:
        self.ledger.count_failure(state.reason)
        survivors, _lost = self.formation.quiesce(set(state.failed_workers), state.reason)
        d = self.policy.after_failure(self.run, self.failures, self.consecutive_failures, state.reason,
                                      self.ledger.repeated_error())
        if isinstance(d, Fail):
            return self.ending.fail(d, survivors=survivors)
        assert isinstance(d, Retry)
        if d.backoff_s:
            self.sleep(d.backoff_s)
        return self.formation.rebuild(survivors, reason=state.reason)

    # -- RESIZING ----------------------------------------------------------------------------
    def _resizing(self, state: Resizing) -> State:
        reason = state.reason.value  # events and logs carry the value ("grow", "preemption")
        self.ledger.incidents.start(reason, is_failure=False, step_before=self.progress.step)
        survivors, lost = self.formation.quiesce(set(), f"lost during {reason}")
        if lost:
            return Restarting(reason=f"worker lost during {reason}", failed_workers=(), since=self.clock())
        why = ("handed over to a newcomer on a node of its own" if state.reason is ResizeReason.SPREAD
               else "preemption notice")
        for wid in state.leaving_workers:
            if wid in survivors:
                survivors.remove(wid)
                self.roster.emit(Event.WORKER_LEFT, wid, reason=why)
                self.supply.crowded.discard(wid)
                if state.reason is ResizeReason.PREEMPTION:
                    self.supply.vacated(wid)
                self.group.kill(wid)
        return self.formation.rebuild(survivors, reason=reason)
