"""The supervisor's control loop: `while not state.is_terminal(): state = transition(state)`.

The controller carries out what the policy decides (policy.py, decisions.py) and decides nothing
itself. It owns membership (which worker holds which rank in which generation), the failure count
and the event log; the worker group behind it owns the actors. Clock and sleep are injected so that
unit tests step it without real time passing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Callable, Protocol

from elastic.config import RunConfig
from elastic.events import Event
from elastic.protocol import Assignment, AssignmentMode, ErrorSignature, PollFailure, WorkerPoll, WorkerState
from elastic.supervisor import policy as pol
from elastic.supervisor.decisions import (Build, Continue, Fail, Finish, Policy, Remove, Resize, ResizeReason,
                                          Restart, Retry, WaitForWorkers)
from elastic.supervisor.states import (Failed, Finished, Resizing, Restarting, Running, Starting, State,
                                       StateType, Stopped, Stopping)
from elastic.supervisor.tracking import Incidents, Progress, Recovery, StepRate
from elastic.supervisor.worker_group import WorkerGroup

log = logging.getLogger(__name__)


class EventSink(Protocol):
    def emit(self, event: Event | str, **fields: Any) -> dict[str, Any]: ...
    def record(self, record: dict[str, Any]) -> None: ...


class MetricsSink(Protocol):
    def extend(self, records: list[dict[str, Any]]) -> None: ...


class Controller:
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
        self.members: list[int] = []  # worker ids in rank order
        self._rank_of: dict[int, int] = {}  # worker id -> rank in the current generation
        self.generation = -1
        self.failures = 0
        self.consecutive_failures = 0
        self._last_error: tuple[int, ErrorSignature | None] = (-2, None)
        """(generation, the error every rank raised in it) of the last failed generation (policy.shared_error)."""
        self.recoveries: list[Recovery] = []
        self.progress = Progress()
        self._incidents = Incidents(clock)
        self._rate = StepRate(clock)
        self._joined: set[int] = set()
        self._next_grow_check = 0.0
        self._last_polls: dict[int, pol.Poll] = {}
        self._next_drain_check = 0.0
        self._notified: set[int] = set()
        self.stop_signal: int | None = None
        """Set (from another thread) when the driver got SIGINT/SIGTERM: commit and end."""
        self.abort_reason: str | None = None
        """Set (from another thread) when the run must end at once (its location was taken over)."""
        self.committed_step = -1
        """The newest step a checkpoint of this run committed (WorkerPoll.committed_step)."""
        self._restored_in: dict[int, int] = {}
        """worker id -> the generation whose WorkerPoll.restored the incidents were told of last."""
        self.newest_step = 0
        """The newest step any worker reported (parked ones included: they hold it)."""
        self.storage_step: Callable[[], int] | None = None
        """The newest step committed on storage (-1: none), read when a stop ends the run, so that what
        the run says is what storage holds (the supervisor actor sets it; the unit tests need none)."""
        self._lost_nodes: list[str] = []
        """Nodes of the workers lost since the last group was built (their standbys replace them)."""
        self._first_built_at: float | None = None
        """When the run's first group was built."""
        self._first_step_at: float | None = None
        """When the run's first group first stepped: standbys start policy.standby_after_s later."""
        self._failure_times: list[float] = []
        """When each failure was seen (what sizes the standby pool)."""

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
            StateType.STOPPING: self._stopping,
        }[state.type]
        nxt = handler(state)
        if nxt.type is not state.type:
            self._show(state=nxt.type.label)
            log.info("supervisor: %s -> %s", state.type.label, nxt.type.label)
        return nxt

    @property
    def policy(self) -> Policy:
        """The run's policy: held in one place, self.run."""
        assert self.run.policy is not None
        return self.run.policy

    @property
    def _failure(self):
        return self.run.failure

    # -- STARTING ----------------------------------------------------------------------------
    def _starting(self, _state: State) -> State:
        sc = self.run.scaling
        assert sc.max_workers is not None
        placeable = self.group.placeable()
        self.group.request(sc.max_workers + sc.spares)
        t0 = self.clock()
        while True:
            if self.stop_signal is not None:
                return self._stopped(self.stop_signal, started=t0)
            self.group.refresh()
            ready = self.group.ready()
            d = self.policy.start(self.run, pol.StartView(ready=len(ready), placeable=placeable,
                                                          waited_s=self.clock() - t0))
            if isinstance(d, Fail):
                return self._fail(d)
            if isinstance(d, Build):
                return self._build(ready[: sc.max_workers], reason="start")
            self.sleep(self._failure.poll_interval_s)

    # -- RUNNING -----------------------------------------------------------------------------
    def _running(self, state: Running) -> State:
        self.group.refresh()
        polls = self.group.poll(self.members, self._failure.poll_timeout_s)
        self._absorb(polls)
        h = pol.classify(polls, self._failure)
        # The grow check is scheduled only while the group is below max_workers: after a shrink the
        # first look for room comes at once.
        grow_due = len(self.members) < (self.run.scaling.max_workers or 0) and self.clock() >= self._next_grow_check
        view = pol.RunningView(members=tuple(self.members), newcomers=len(self._newcomers(limit=1)),
                               grow_due=grow_due)
        d = self.policy.running(self.run, h, view)
        if grow_due:
            self._next_grow_check = self.clock() + self.run.scaling.grow_interval_s
        if isinstance(d, Fail):
            return self._fail(d)
        if isinstance(d, Finish):
            self._close_incidents(finished=True)
            return Finished()
        if isinstance(d, Restart):
            self.events.emit(Event.GROUP_FAILED, generation=self.generation, reason=d.reason,
                             errors={self._rank_of[w]: e.strip().splitlines()[-1] for w, e in h.errors.items() if e})
            return Restarting(reason=d.reason, failed_workers=d.lost, since=self.clock())
        if isinstance(d, Resize):
            reason = ResizeReason(d.reason)  # a policy written before the enum gives its value
            if reason is ResizeReason.GROW:
                self.group.request_pause(self.members)
            return Resizing(reason=reason, leaving_workers=d.leaving, since=self.clock())
        assert isinstance(d, Continue)
        self._watch_drains()
        self._top_up(background=True)
        # The run's first start-up is protected from standbys' start-up (a Ray worker process and
        # a torch import) until its first step (+ standby_after_s); after a rebuild, only until the recovery is over
        # (the new group has taken its first step: starting the successor of a promoted standby
        # during the restore slowed it by 1-2 s here), so that the next failure (often soon after
        # the first, on the same spot pool) still finds a warm one.
        if (self._first_step_at is not None and self.clock() - self._first_step_at >= self.policy.standby_after_s
                and not self._incidents.restoring):
            self._keep_standbys()
        self.sleep(self._failure.poll_interval_s)
        return state

    # -- RESTARTING --------------------------------------------------------------------------
    def _restarting(self, state: Restarting) -> State:
        self._failure_times.append(self.clock())
        self.failures += 1
        self.consecutive_failures += 1
        self._show(failures=self.failures)
        self._incidents.start(state.reason, is_failure=True, step_before=self.progress.step)
        survivors, _lost = self._quiesce(set(state.failed_workers), state.reason)
        d = self.policy.after_failure(self.run, self.failures, self.consecutive_failures, state.reason,
                                      self._repeated_error())
        if isinstance(d, Fail):
            return self._fail(d, survivors=survivors)
        assert isinstance(d, Retry)
        if d.backoff_s:
            self.sleep(d.backoff_s)
        return self._rebuild(survivors, reason=state.reason)

    def _repeated_error(self) -> tuple[ErrorSignature | None, ...]:
        """The error every member raised in this generation, after the one of the generation just
        before when that one failed too (what policy.after_failure compares)."""
        mine = pol.shared_error({w: self._last_polls.get(w) for w in self.members}, self.generation)
        before_gen, before = self._last_error
        self._last_error = (self.generation, mine)
        return (before, mine) if before_gen == self.generation - 1 else (mine,)

    # -- RESIZING ----------------------------------------------------------------------------
    def _resizing(self, state: Resizing) -> State:
        reason = state.reason.value  # events and logs carry the value ("grow", "preemption")
        self._incidents.start(reason, is_failure=False, step_before=self.progress.step)
        survivors, lost = self._quiesce(set(), f"lost during {reason}")
        if lost:
            return Restarting(reason=f"worker lost during {reason}", failed_workers=(), since=self.clock())
        for wid in state.leaving_workers:
            if wid in survivors:
                survivors.remove(wid)
                self._emit_worker(Event.WORKER_LEFT, wid, reason="preemption notice")
                self.group.kill(wid)
        return self._rebuild(survivors, reason=reason)

    # -- STOPPING ----------------------------------------------------------------------------
    def _stopping(self, state: Stopping) -> State:
        """Commit the newest state the group holds, within stop_timeout_s, and end. A running group
        commits at its next agreed step boundary (as for a preemption notice) and leaves; without
        one (a stop during a rebuild) the survivors commit what they hold."""
        t0 = self.clock()
        deadline = t0 + self.run.stop_timeout_s
        if state.survivors:
            self._final_save(list(state.survivors), timeout_s=self.run.stop_timeout_s)
        else:
            self.group.request_stop(self.members)
            f = self._failure
            while self.clock() < deadline:
                polls = self.group.poll(self.members, f.poll_timeout_s)
                self._absorb(polls)
                if not any(isinstance(p, WorkerPoll) and p.state == WorkerState.RUNNING for p in polls.values()):
                    break
                self.sleep(f.poll_interval_s)
        self._fence()
        return self._stopped(state.signal, started=t0)

    def _fence(self) -> None:
        """Past the stop's deadline nothing may commit: members still at work (a save not committed
        in time) are killed before the run declares its end, and the truth is then read from storage
        (a commit whose event had not arrived yet counts; one that had not happened never will)."""
        polls = self.group.poll(self.members, self._failure.poll_timeout_s)
        self._absorb(polls)
        for wid in [w for w, p in polls.items() if isinstance(p, WorkerPoll) and p.state == WorkerState.RUNNING]:
            self._emit_worker(Event.WORKER_LEFT, wid, reason="stopped: still saving at the stop timeout")
            self.group.kill(wid)
        if self.storage_step is not None:
            self.committed_step = max(self.committed_step, self.storage_step())

    def _stopped(self, signal: int, *, started: float) -> Stopped:
        newest = max(self.newest_step, self.progress.step)
        committed = self.committed_step >= newest or newest <= 0
        # 128 + signal when the newest state is committed (what a stopped process exits with); 1 when
        # it is not: the caller learns it from the exit code alone (and from run_stopped.committed).
        name = {2: "SIGINT", 15: "SIGTERM"}.get(signal, f"signal {signal}")
        if committed:
            message = (f"stopped by {name} at step {newest}; its state is committed: continue with "
                       "`elastic resume URI`")
        else:
            message = (f"stopped by {name} at step {newest}, but that state could not be committed within "
                       f"{self.run.stop_timeout_s:g}s (newest committed: step {self.committed_step}); "
                       "`elastic resume URI` continues from there")
            self.events.emit(Event.CHECKPOINT_FAILED, step=newest, reason=f"not committed within the stop timeout "
                                                                          f"({self.run.stop_timeout_s:g}s)")
        self.events.emit(Event.RUN_STOPPED, signal=name, step=newest, committed_step=self.committed_step,
                         committed=committed, seconds=round(self.clock() - started, 3))
        return Stopped(message=message, exit_code=128 + signal if committed else 1, committed=committed)

    # -- shared mechanics --------------------------------------------------------------------
    def _quiesce(self, known_lost: set[int], reason: str) -> tuple[list[int], list[int]]:
        """Get every member out of the old group: parked, finished or gone (the policy says who
        must go and when)."""
        lost = [w for w in self.members if w in known_lost]
        alive = [w for w in self.members if w not in known_lost]
        for wid in lost:
            self._drop(wid, reason)
        self.group.request_pause(alive)
        f = self._failure
        t0 = self.clock()
        first_park: float | None = None
        while alive:
            polls = self.group.poll(alive, f.poll_timeout_s)
            self._absorb(polls)
            answers = {w: p for w, p in polls.items() if isinstance(p, WorkerPoll)}
            running = [w for w, p in answers.items() if p.state == WorkerState.RUNNING]
            if first_park is None and any(p.state != WorkerState.RUNNING for p in answers.values()):
                first_park = self.clock()
            now = self.clock()
            d = self.policy.quiesce(self.run, pol.QuiesceView(
                polls=polls, since_first_park_s=None if first_park is None else now - first_park, waited_s=now - t0))
            if isinstance(d, Remove):
                for wid in d.workers:
                    self._drop(wid, d.label)
                    lost.append(wid)
                    alive.remove(wid)
                continue
            if not running:
                break
            self.sleep(f.poll_interval_s)
        return alive, lost

    def _rebuild(self, survivors: list[int], *, reason: str) -> State:
        """Form the next group: the survivors, then ready newcomers and standbys promoted on the
        nodes of the workers lost (as soon as they are ready, also while waiting). A survivor that
        dies while the group waits is dropped there and then (another failure): a group is never
        handed to a member that is gone."""
        sc = self.run.scaling
        assert sc.max_workers is not None
        survivors = list(survivors)
        members = list(survivors) + self._newcomers(limit=sc.max_workers - len(survivors))
        members += self._promote(missing=sc.max_workers - len(members))
        t0 = self.clock()
        no_room_since: float | None = None
        announced = False
        while True:
            if self.stop_signal is not None:
                return Stopping(signal=self.stop_signal, survivors=tuple(survivors))
            gone = self._gone(survivors)
            if gone:
                for wid in gone:
                    members.remove(wid)
                    if wid in survivors:
                        survivors.remove(wid)
                self._failed_while_rebuilding(gone)
                members += self._promote(missing=sc.max_workers - len(members))
            now = self.clock()
            d = self.policy.membership(self.run, pol.MembershipView(
                have=len(members), waited_s=now - t0,
                no_room_for_s=None if no_room_since is None else now - no_room_since))
            if isinstance(d, Build):
                self._top_up(background=True)
                return self._build(members, reason=reason)
            if isinstance(d, Fail):
                return self._fail(d, survivors=survivors)
            assert isinstance(d, WaitForWorkers)
            if d.below_min and not announced:
                announced = True
                self.events.emit(Event.WAITING_FOR_WORKERS, have=len(members), need=sc.min_workers)
            self._top_up()
            self.group.refresh()
            members += self._newcomers(limit=sc.max_workers - len(members), exclude=members)
            members += self._promote(missing=sc.max_workers - len(members))
            if len(members) >= sc.max_workers:
                continue
            if self.group.placeable() > 0:
                no_room_since = None
            elif no_room_since is None:
                no_room_since = self.clock()
            self.sleep(self._failure.poll_interval_s)

    def _promote(self, *, missing: int) -> list[int]:
        """Promote ready standbys on the nodes of lost workers (each such node has a worker's
        resources free again), up to `missing`; their ids."""
        if missing <= 0 or not self._lost_nodes:
            return []
        picks = list(self.policy.standbys_to_promote(self.run, missing=missing, standbys=self.group.standbys(),
                                                     lost_nodes=self._lost_nodes))
        for wid in picks:
            node = self.group.infos[wid].node_id if wid in self.group.infos else None
            self.group.promote(wid)
            if node in self._lost_nodes:
                self._lost_nodes.remove(node)  # that node's free slot is taken now
        return picks

    def _gone(self, wids: list[int]) -> list[int]:
        """Of these parked survivors, those whose last word says they are gone (their watches
        answer at once when they die: this costs no round trip)."""
        if not wids:
            return []
        polls = self.group.poll(list(wids), self._failure.poll_timeout_s)
        self._absorb(polls)
        return [w for w, p in polls.items() if isinstance(p, PollFailure)
                or (isinstance(p, WorkerPoll) and p.state == WorkerState.FAILED)]

    def _failed_while_rebuilding(self, wids: list[int]) -> None:
        """Members of the next group lost before it was built: a failure of its own (counted, an
        incident opened), the workers dropped."""
        self._failure_times.append(self.clock())
        self.failures += 1
        self.consecutive_failures += 1
        self._show(failures=self.failures)
        self._incidents.start(f"worker(s) lost while the next group was formed", is_failure=True,
                              step_before=self.progress.step)
        for wid in wids:
            self._drop(wid, "lost while the next group was formed")

    def _build(self, members: list[int], *, reason: str,
               mode: AssignmentMode = AssignmentMode.TRAIN) -> Running | Restarting:
        t0 = self.clock()
        self._lost_nodes = []
        self.generation += 1
        g = self.generation
        self.members = list(members)
        self._rank_of = {w: r for r, w in enumerate(self.members)}
        host, port = self.store_addr
        per_node: dict[str, int] = {}
        for wid in self.members:
            info = self.group.infos.get(wid)
            node = info.node_id if info else "?"
            per_node[node] = per_node.get(node, 0) + 1
        nodes: dict[str, int] = {}
        assignments = {}
        for rank, wid in enumerate(self.members):
            info = self.group.infos.get(wid)
            node = info.node_id if info else "?"
            local_rank = nodes.get(node, 0)
            nodes[node] = local_rank + 1
            assignments[wid] = Assignment(
                generation=g, rank=rank, world_size=len(self.members), store_host=host, store_port=port,
                backend=self.backend, collective_timeout_s=self._failure.collective_timeout_s,
                rendezvous_timeout_s=self.policy.rendezvous_timeout_s(self.run, len(self.members)),
                local_rank=local_rank, mode=mode, local_world_size=per_node[node], store_prefix=self.store_prefix,
                gpu_ids=self._gpu_ids(wid), node_id=node)
            if wid not in self._joined:
                self._joined.add(wid)
                self._emit_worker(Event.WORKER_STARTED, wid, generation=g,
                                  background_startup=info.background_startup if info else None)
        timeout = self._failure.poll_timeout_s + self.policy.assignment_slack_s
        refused = self.group.start(assignments, timeout)
        self.events.emit(Event.GROUP_BUILT, generation=g, world_size=len(self.members), reason=reason,
                         seconds=round(self.clock() - t0, 4),
                         members=[self._describe(w) for w in self.members])
        if refused:
            # A member that is gone (or refused) before the group formed: the generation is given up
            # at once. The others are in its rendezvous, which they leave as soon as they are asked to
            # pause (never after a timeout), and the next group is formed without it.
            self.events.emit(Event.GROUP_FAILED, generation=g, reason="a member was lost while the group was built",
                             errors={})
            for wid in refused:
                self._drop(wid, "lost while its group was built")
            self.members = [w for w in self.members if w not in refused]
            self._rank_of = {w: r for r, w in enumerate(self.members)}
            return Restarting(reason="worker lost while the group was built", failed_workers=(), since=self.clock())
        self._show(world_size=len(self.members), generation=g)
        if self._first_built_at is None:
            self._first_built_at = self.clock()
        self._rate.reset()
        return Running(generation=g)

    def _gpu_ids(self, wid: int) -> tuple[str, ...] | None:
        """A promoted standby's GPUs come from its reservation (it waits for it to be placed); None
        when it was not placed in time (Assignment.gpu_ids: the worker cannot train, it is lost)."""
        if self.run.scaling.gpus_per_worker <= 0:
            return ()
        try:
            return self.group.gpu_ids(wid, self._failure.poll_timeout_s + self.policy.assignment_slack_s)
        except Exception:  # noqa: BLE001 - not placed in time
            return None

    def _keep_standbys(self) -> None:
        """Keep the standby pool on every node that hosts ranks, sized by the policy from the
        failure rate seen so far and the standbys' measured start-up."""
        now = self.clock()
        since = now - (self._first_built_at if self._first_built_at is not None else now)
        window = min(self.policy.standby_rate_window_s, since)
        recent = sum(1 for t in self._failure_times if t >= now - window)
        per_node = self.policy.standbys_per_node(self.run, failures_in_window=recent, window_s=window,
                                                 startup_s=self.group.standby_startup_s())
        self.group.ensure_standbys({i.node_id for w in self.members if (i := self.group.infos.get(w)) is not None},
                                   per_node=per_node)

    def _watch_drains(self) -> None:
        """A node being drained (spot preemption via Ray, autoscaler scale-down) gets the same
        treatment as SIGTERM to its workers: commit at the next step boundary, then leave."""
        if self.clock() < self._next_drain_check:
            return
        self._next_drain_check = self.clock() + self.policy.drain_check_interval_s
        draining = self.group.draining_nodes()
        if not draining:
            return
        leaving = [w for w in self.members if w not in self._notified
                   and (info := self.group.infos.get(w)) is not None and info.node_id in draining]
        if leaving:
            self._notified.update(leaving)
            for wid in leaving:
                self._emit_worker(Event.NODE_DRAINING, wid)
            self.group.request_preempt(leaving)

    def _newcomers(self, *, limit: int, exclude: list[int] | None = None) -> list[int]:
        if limit <= 0:
            return []
        taken = set(self.members) | set(exclude or [])
        return [w for w in self.group.ready() if w not in taken][:limit]

    def _top_up(self, *, background: bool = False) -> None:
        """Keep as many workers requested as the policy wants; `background` when the group trains
        meanwhile (they start at idle priority)."""
        n = self.policy.to_request(self.run, len(set(self.group.ready()) | set(self.group.pending())))
        if n > 0:
            self.group.request(n, background=background)

    def _fail(self, d: Fail, *, survivors: list[int] | None = None) -> Failed:
        error = d.error.replace("{resources}", self.group.describe_resources()) if "{resources}" in d.error \
            else d.error
        if d.final_save and survivors:
            self._final_save(survivors)
            if self.committed_step < self.progress.step:
                error += (f"; the final checkpoint (step {self.progress.step}) was not committed: the newest "
                          f"committed one is step {self.committed_step}")
        else:
            self._last_words()
        return Failed(error=error, exit_code=d.exit_code)

    def _last_words(self) -> None:
        """Take in what the members still have to say before the run ends: their answers arrive
        one by one, and the one that decided the failure may precede the event another rank sent
        with its own failure. Bounded by the policy's last_words_s; over once none is running."""
        f = self._failure
        deadline = self.clock() + self.policy.last_words_s
        while True:
            polls = self.group.poll(self.members, min(f.poll_timeout_s, self.policy.last_words_s))
            self._absorb(polls)
            if self.clock() >= deadline or not any(
                    isinstance(p, WorkerPoll) and p.state == WorkerState.RUNNING for p in polls.values()):
                return
            self.sleep(f.poll_interval_s)

    def _final_save(self, survivors: list[int], *, timeout_s: float | None = None) -> None:
        """The run ends unfinished: have the survivors commit the newest state they hold, so that
        `elastic resume` starts from it rather than from an older periodic checkpoint. Bounded."""
        f = self._failure
        self._build(survivors, reason="final checkpoint", mode=AssignmentMode.SAVE)
        deadline = self.clock() + (timeout_s if timeout_s is not None else self.policy.final_save_timeout(self.run))
        while self.clock() < deadline:
            polls = self.group.poll(self.members, f.poll_timeout_s)
            self._absorb(polls)
            if not any(isinstance(p, WorkerPoll) and p.state == WorkerState.RUNNING for p in polls.values()):
                return
            self.sleep(f.poll_interval_s)

    # -- bookkeeping -------------------------------------------------------------------------
    def _absorb(self, polls: dict[int, pol.Poll]) -> None:
        """Take in what the workers said: their events, their progress, and what it closes."""
        self._last_polls.update(polls)
        answers = {w: p for w, p in polls.items() if isinstance(p, WorkerPoll)}
        self._forward_events(answers)
        self._take_facts(answers)
        if self.metrics is not None:
            self.metrics.extend([{"step": step, "time": t, **m} for p in answers.values() for step, t, m in p.records])
        self.newest_step = max([self.newest_step, *(p.step for p in answers.values())])
        steps = [p.step for p in answers.values()
                 if p.generation == self.generation and p.state in (WorkerState.RUNNING, WorkerState.FINISHED)]
        if self.members and (p := answers.get(self.members[0])) is not None and p.metrics:
            self._show(metrics=dict(p.metrics), loss=p.metrics.get("loss"))
        self._show(standbys=len(self.group.standbys()))
        if not steps:
            self._account()
            return
        step = max(steps)
        if self._first_step_at is None and self._first_built_at is not None and step > self.progress.step:
            self._first_step_at = self.clock()
        steps_per_s = self._rate.observe(step)
        closed = self._close_incidents(step)
        self._show(steps_per_s=steps_per_s, recoveries=len(self.recoveries),
                   step=step if self._incidents.open or closed else max(self.progress.step, step))

    def _close_incidents(self, step: int | None = None, *, finished: bool = False) -> list[Recovery]:
        """Close the incidents the group has stepped beyond (all of them when the run finished) and
        emit their records."""
        closed = self._incidents.close_past(self.progress.step if step is None else step, generation=self.generation,
                                            world_size=len(self.members), finished=finished)
        self._account()
        ettr = None if self.progress.ettr is None else round(self.progress.ettr, 4)
        closed = [replace(rec, ettr=ettr) for rec in closed]
        for rec in closed:
            self.recoveries.append(rec)
            self.events.emit(Event.RECOVERED if rec.failure else Event.RESIZED, **rec.as_dict())
            if rec.failure:
                self.consecutive_failures = 0
                self._show(failure_cost_s=(*self.progress.failure_cost_s, rec.cost_s))
        return closed

    def _account(self) -> None:
        """The run's goodput so far, for progress: the time its failures cost and its ETTR."""
        if self._first_step_at is not None:  # the time before the first step is start-up, not lost
            self._show(lost_s=round(self._incidents.lost_s(self._first_step_at), 4),
                       ettr=self._incidents.ettr(self._first_step_at))

    def _show(self, **changes: Any) -> None:
        """Replace the progress snapshot (the driver reads it from another thread)."""
        self.progress = replace(self.progress, **changes)

    def _forward_events(self, answers: dict[int, WorkerPoll]) -> None:
        """Workers' events go to the log with who sent them."""
        rank_of = self._rank_of
        for wid, poll in answers.items():
            info = self.group.infos.get(wid)
            for ev in poll.events:
                self.events.record({**ev, "worker": wid, "rank": rank_of.get(wid), "pid": info.pid if info else None})

    def _take_facts(self, answers: dict[int, WorkerPoll]) -> None:
        """What the workers' typed fields say: the newest committed step, and where each rank of this
        generation restored from (told to the open incidents once per rank and generation)."""
        for wid, poll in answers.items():
            self.committed_step = max(self.committed_step, poll.committed_step)
            r = poll.restored
            if r is not None and r.generation == self.generation and self._restored_in.get(wid) != r.generation:
                self._restored_in[wid] = r.generation
                self._incidents.restored(r.step, r.lost_steps)

    def _drop(self, wid: int, reason: str) -> None:
        info = self.group.infos.get(wid)
        if info is not None:
            self._lost_nodes.append(info.node_id)
        last = self._last_polls.get(wid)
        error = last.error if isinstance(last, WorkerPoll) and last.error else None
        self._emit_worker(Event.WORKER_FAILED, wid, reason=reason, error=error)
        self.group.kill(wid)

    def _emit_worker(self, event: Event, wid: int, **fields: Any) -> None:
        self.events.emit(event, **self._describe(wid), **fields)

    def _describe(self, wid: int) -> dict[str, Any]:
        info = self.group.infos.get(wid)
        rank = self._rank_of.get(wid)
        return {"worker": wid, "rank": rank, "pid": info.pid if info else None,
                "node_id": info.node_id if info else None}
