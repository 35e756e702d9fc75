"""The supervisor's control loop: `while not state.is_terminal(): state = step(state)`.

The controller carries out what the policies decide. It owns membership (which worker holds which
rank in which generation), the failure budget, and the event log; the worker group behind it owns
the actors. Clock and sleep are injected so that unit tests step it without real time passing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from elastic.config import RunConfig
from elastic.supervisor import policy
from elastic.supervisor.states import (Failed, Finished, Resizing, Restarting, Running, Starting, State,
                                       StateType)
from elastic.supervisor.worker_group import WorkerGroup
from elastic.worker.protocol import Assignment, WorkerPoll

log = logging.getLogger(__name__)


class EventSink(Protocol):
    def emit(self, event: str, **fields: Any) -> dict[str, Any]: ...
    def record(self, record: dict[str, Any]) -> None: ...


@dataclass
class Progress:
    state: str = "starting"
    step: int = 0
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    steps_per_s: float = 0.0
    world_size: int = 0
    generation: int = -1
    failures: int = 0
    recoveries: int = 0
    started: float = field(default_factory=time.time)


@dataclass
class _Incident:
    reason: str
    since: float
    step_before: int
    is_failure: bool
    restored_step: int | None = None
    lost_steps: int = 0  # as the restoring ranks measured it (the supervisor's view lags a poll)


class Controller:
    def __init__(self, run: RunConfig, group: WorkerGroup, events: EventSink, store_addr: tuple[str, int], *,
                 backend: str = "gloo", clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.run = run
        self.group = group
        self.events = events
        self.store_addr = store_addr
        self.backend = backend
        self.clock = clock
        self.sleep = sleep
        self.members: list[int] = []  # worker ids in rank order
        self.generation = -1
        self.failures = 0
        self.consecutive_failures = 0
        self.recoveries: list[dict[str, Any]] = []
        self.progress = Progress()
        # Open incidents: a failure during a recovery opens a second one; each is closed (and gets
        # its own recovered/resized record) when the group first steps past the restored state.
        self._incidents: list[_Incident] = []
        self._joined: set[int] = set()
        self._rate_mark: tuple[float, int] | None = None
        self._next_grow_check = 0.0
        self._last_polls: dict[int, WorkerPoll | str] = {}
        self._next_drain_check = 0.0
        self._notified: set[int] = set()

    # -- loop --------------------------------------------------------------------------------
    def run_to_end(self) -> State:
        state: State = Starting()
        while not state.is_terminal():
            state = self.transition(state)
        return state

    def transition(self, state: State) -> State:
        handler = {
            StateType.STARTING: self._starting,
            StateType.RUNNING: self._running,
            StateType.RESTARTING: self._restarting,
            StateType.RESIZING: self._resizing,
        }[state.type]
        nxt = handler(state)
        if nxt.type is not state.type:
            self.progress.state = nxt.type.label
            log.info("supervisor: %s -> %s", state.type.label, nxt.type.label)
        return nxt

    @property
    def _scaling(self):
        return self.run.scaling

    @property
    def _failure(self):
        return self.run.failure

    # -- STARTING ----------------------------------------------------------------------------
    def _starting(self, _state: State) -> State:
        sc = self._scaling
        assert sc.max_workers is not None
        goal = max(sc.min_workers, min(sc.max_workers, self.group.placeable()))
        self.group.request(sc.max_workers + sc.spares)
        deadline = self.clock() + sc.placement_timeout_s
        while True:
            self.group.refresh()
            ready = self.group.ready()
            if len(ready) >= goal or self.clock() >= deadline:
                break
            self.sleep(self._failure.poll_interval_s)
        if len(ready) < sc.min_workers:
            msg = (f"cannot place min_workers={sc.min_workers} workers of "
                   f"{sc.resources_per_worker} each within {sc.placement_timeout_s:g}s "
                   f"({len(ready)} placed; cluster: {self.group.describe_resources()}): "
                   "lower --min-workers or add nodes")
            return Failed(error=msg, exit_code=2)
        return self._build(ready[: sc.max_workers], reason="start")

    # -- RUNNING -----------------------------------------------------------------------------
    def _running(self, state: Running) -> State:
        sc = self._scaling
        self.group.refresh()
        polls = self.group.poll(self.members, self._failure.poll_timeout_s)
        self._absorb(polls)
        h = policy.classify(polls, self._failure)
        if h.fatal:
            return self._fail(h.errors.get(h.fatal[0], "fatal error"), exit_code=2)
        if len(h.finished) == len(self.members):
            return Finished()
        # Ranks leave at an agreed boundary only for a preemption (Running asks for no other pause);
        # any other park means the group broke under them.
        broken = set(h.parked) - set(h.paused)
        if h.lost or broken or (h.paused and not h.preempted):
            reason = self._describe_loss(h)
            rank_of = {w: r for r, w in enumerate(self.members)}
            self.events.emit("group_failed", generation=self.generation, reason=reason,
                             errors={rank_of[w]: e.strip().splitlines()[-1] for w, e in h.errors.items() if e})
            return Restarting(reason=reason, failed_workers=h.lost, since=self.clock())
        if h.paused and h.preempted:
            return Resizing(reason="preemption", leaving_workers=h.preempted, since=self.clock())
        self._watch_drains()
        if len(self.members) < (sc.max_workers or 0) and self.clock() >= self._next_grow_check:
            self._next_grow_check = self.clock() + sc.grow_interval_s
            if self._newcomers(limit=1):
                self.group.request_pause(self.members)
                return Resizing(reason="grow", since=self.clock())
        self._top_up(background=True)
        self.sleep(self._failure.poll_interval_s)
        return state

    # -- RESTARTING --------------------------------------------------------------------------
    def _restarting(self, state: Restarting) -> State:
        self.failures += 1
        self.consecutive_failures += 1
        self.progress.failures = self.failures
        self._start_incident(state.reason, is_failure=True)
        survivors, _lost = self._quiesce(set(state.failed_workers), state.reason)
        if not self._failure.failures_left(self.failures):
            self._final_save(survivors)
            return self._fail(
                f"failure budget spent: {self.failures} failures > max_failures={self._failure.max_failures} "
                f"(last: {state.reason}); the newest committed checkpoint is kept: continue with "
                "`elastic resume URI`", exit_code=1)
        backoff = self._failure.backoff_s(self.consecutive_failures)
        if backoff:
            self.sleep(backoff)
        return self._rebuild(survivors, reason=state.reason)

    # -- RESIZING ----------------------------------------------------------------------------
    def _resizing(self, state: Resizing) -> State:
        self._start_incident(state.reason, is_failure=False)
        survivors, lost = self._quiesce(set(), f"lost during {state.reason}")
        if lost:
            return Restarting(reason=f"worker lost during {state.reason}", failed_workers=(), since=self.clock())
        for wid in state.leaving_workers:
            if wid in survivors:
                survivors.remove(wid)
                self._emit_worker("worker_left", wid, reason="preemption notice")
                self.group.kill(wid)
        return self._rebuild(survivors, reason=state.reason)

    # -- shared mechanics --------------------------------------------------------------------
    def _quiesce(self, known_lost: set[int], reason: str) -> tuple[list[int], list[int]]:
        """Get every member out of the old group: parked, finished or gone. Bounded by the
        collective timeout (a rank blocked on a frozen peer is released by it)."""
        lost = [w for w in self.members if w in known_lost]
        alive = [w for w in self.members if w not in known_lost]
        for wid in lost:
            self._drop(wid, reason)
        self.group.request_pause(alive)
        f = self._failure
        deadline = self.clock() + f.collective_timeout_s + f.poll_timeout_s + 1.0
        first_park: float | None = None
        while alive:
            polls = self.group.poll(alive, f.poll_timeout_s)
            self._absorb(polls)
            h = policy.classify(polls, f)
            for label, wids in (("died", h.dead), ("stopped answering", h.unresponsive), ("hung", h.hung)):
                for wid in wids:
                    self._drop(wid, label)
                    lost.append(wid)
                    alive.remove(wid)
            still = [w for w in alive if isinstance(polls.get(w), WorkerPoll) and polls[w].state == "running"]
            if not still:
                break
            if first_park is None and len(still) < len(alive):
                first_park = self.clock()
            now = self.clock()
            # Peers already left the group: a rank neither finishing nor blocked in a collective
            # for a poll timeout after that is stuck in user code.
            blame = []
            if first_park is not None and now - first_park > f.poll_timeout_s:
                blame = [w for w in policy.stragglers({w: polls[w] for w in still}, f.collective_timeout_s)]
            if now >= deadline:
                blame = still
            for wid in blame:
                self._drop(wid, "stuck while its peers left the group")
                lost.append(wid)
                alive.remove(wid)
            self.sleep(f.poll_interval_s)
        return alive, lost

    def _rebuild(self, survivors: list[int], *, reason: str) -> State:
        sc = self._scaling
        f = self._failure
        assert sc.max_workers is not None
        members = list(survivors)
        want = sc.max_workers - len(members)
        members += self._newcomers(limit=want)
        # Keep the world size when a replacement can be placed: same size, same math.
        deadline = self.clock() + sc.placement_timeout_s
        no_room_since: float | None = None
        while len(members) < sc.max_workers and self.clock() < deadline:
            if sc.replacement == "continue" and len(members) >= sc.min_workers:
                self._top_up(background=True)  # the replacement joins later, through a resize
                break
            self._top_up()
            self.group.refresh()
            members += self._newcomers(limit=sc.max_workers - len(members), exclude=members)
            if len(members) >= sc.max_workers:
                break
            if self.group.placeable() > 0:
                no_room_since = None
            else:
                no_room_since = no_room_since if no_room_since is not None else self.clock()
                settled = self.clock() - no_room_since >= 1.0
                if settled and len(members) >= sc.min_workers:
                    break  # no room for now: continue smaller, grow back when room appears
            self.sleep(f.poll_interval_s)
        if len(members) < sc.min_workers:
            wait_until = self.clock() + f.below_min_wait_s
            self.events.emit("waiting_for_workers", have=len(members), need=sc.min_workers)
            while len(members) < sc.min_workers and self.clock() < wait_until:
                self._top_up()
                self.group.refresh()
                members += self._newcomers(limit=sc.min_workers - len(members), exclude=members)
                self.sleep(f.poll_interval_s)
        if len(members) < sc.min_workers:
            self._final_save(survivors)
            return self._fail(
                f"only {len(members)} workers available, below min_workers={sc.min_workers}, after waiting "
                f"{f.below_min_wait_s:g}s (cluster: {self.group.describe_resources()}); resume later with "
                "`elastic resume URI`", exit_code=1)
        return self._build(members, reason=reason)

    def _build(self, members: list[int], *, reason: str, mode: str = "train") -> Running:
        t0 = self.clock()
        self.generation += 1
        g = self.generation
        self.members = list(members)
        host, port = self.store_addr
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
                local_rank=local_rank, mode=mode)
            if wid not in self._joined:
                self._joined.add(wid)
                self._emit_worker("worker_started", wid, generation=g,
                                  background_startup=info.background_startup if info else None)
        # A worker that refuses its assignment is lost: killing it breaks the new group at once,
        # and the next poll turns that into a failure (never a silent wait).
        for wid in self.group.start(assignments, self._failure.poll_timeout_s + 10.0):
            self._drop(wid, "did not accept its assignment")
        self.events.emit("group_built", generation=g, world_size=len(self.members), reason=reason,
                         seconds=round(self.clock() - t0, 4),
                         members=[self._describe(w) for w in self.members])
        self.progress.world_size = len(self.members)
        self.progress.generation = g
        self._rate_mark = None
        return Running(generation=g)

    def _watch_drains(self) -> None:
        """A node being drained (spot preemption via Ray, autoscaler scale-down) gets the same
        treatment as SIGTERM to its workers: commit at the next step boundary, then leave."""
        if self.clock() < self._next_drain_check:
            return
        self._next_drain_check = self.clock() + 1.0
        draining = self.group.draining_nodes()
        if not draining:
            return
        leaving = [w for w in self.members if w not in self._notified
                   and (info := self.group.infos.get(w)) is not None and info.node_id in draining]
        if leaving:
            self._notified.update(leaving)
            for wid in leaving:
                self._emit_worker("node_draining", wid)
            self.group.request_preempt(leaving)

    def _newcomers(self, *, limit: int, exclude: list[int] | None = None) -> list[int]:
        if limit <= 0:
            return []
        taken = set(self.members) | set(exclude or [])
        return [w for w in self.group.ready() if w not in taken][:limit]

    def _top_up(self, *, background: bool = False) -> None:
        """Keep max_workers + spares requested; `background` when the group trains meanwhile."""
        sc = self._scaling
        assert sc.max_workers is not None
        have = len(set(self.group.ready()) | set(self.group.pending()))
        if have < sc.max_workers + sc.spares:
            self.group.request(sc.max_workers + sc.spares - have, background=background)

    def _final_save(self, survivors: list[int]) -> None:
        """The run ends unfinished: have the survivors commit the newest state they hold, so that
        `elastic resume` starts from it rather than from an older periodic checkpoint. Bounded."""
        if not survivors:
            return
        f = self._failure
        self._build(survivors, reason="final checkpoint", mode="save")
        deadline = self.clock() + 2 * f.collective_timeout_s + f.poll_timeout_s
        while self.clock() < deadline:
            polls = self.group.poll(self.members, f.poll_timeout_s)
            self._absorb(polls)
            if not any(isinstance(p, WorkerPoll) and p.state == "running" for p in polls.values()):
                return
            self.sleep(f.poll_interval_s)

    # -- bookkeeping -------------------------------------------------------------------------
    def _start_incident(self, reason: str, *, is_failure: bool) -> None:
        self._incidents.append(_Incident(reason=reason, since=self.clock(), step_before=self.progress.step,
                                         is_failure=is_failure))

    def _absorb(self, polls: dict[int, WorkerPoll | str]) -> None:
        rank_of = {w: r for r, w in enumerate(self.members)}
        self._last_polls.update(polls)
        steps = []
        for wid, poll in polls.items():
            if not isinstance(poll, WorkerPoll):
                continue
            info = self.group.infos.get(wid)
            for ev in poll.events:
                ev = {**ev, "worker": wid, "rank": rank_of.get(wid), "pid": info.pid if info else None}
                self.events.record(ev)
                if ev["event"] == "restored" and ev.get("generation") == self.generation:
                    for inc in self._incidents:
                        inc.restored_step = ev.get("step")
                        inc.lost_steps = max(inc.lost_steps, int(ev.get("lost_steps") or 0))
            if poll.generation == self.generation and poll.state in ("running", "finished"):
                steps.append(poll.step)
            if rank_of.get(wid) == 0 and poll.metrics:
                self.progress.metrics = poll.metrics
                self.progress.loss = poll.metrics.get("loss")
        if not steps:
            return
        step = max(steps)
        now = self.clock()
        if self._rate_mark is None:
            self._rate_mark = (now, step)
        elif now - self._rate_mark[0] >= 1.0:
            t0, s0 = self._rate_mark
            self.progress.steps_per_s = (step - s0) / (now - t0)
            self._rate_mark = (now, step)
        done = [i for i in self._incidents if i.restored_step is not None and step > i.restored_step]
        for inc in done:
            assert inc.restored_step is not None
            rec = {"reason": inc.reason, "seconds": round(now - inc.since, 4),
                   "lost_steps": max(inc.lost_steps, inc.step_before - inc.restored_step),
                   "generation": self.generation,
                   "world_size": len(self.members), "failure": inc.is_failure}
            self.recoveries.append(rec)
            self.events.emit("recovered" if inc.is_failure else "resized", **rec)
            if inc.is_failure:
                self.consecutive_failures = 0
        self._incidents = [i for i in self._incidents if i not in done]
        self.progress.recoveries = len(self.recoveries)
        self.progress.step = step if self._incidents or done else max(self.progress.step, step)

    def _describe_loss(self, h: policy.Health) -> str:
        parts = []
        for label, wids in (("died", h.dead), ("stopped answering", h.unresponsive), ("hung", h.hung),
                            ("raised", h.failed)):
            if wids:
                parts.append(f"rank(s) {self._ranks(wids)} {label}")
        if not parts:
            parts.append(f"rank(s) {self._ranks(h.parked)} left a broken process group")
        return "; ".join(parts)

    def _ranks(self, wids: tuple[int, ...] | list[int]) -> str:
        return ",".join(str(self.members.index(w)) if w in self.members else f"w{w}" for w in wids)

    def _drop(self, wid: int, reason: str) -> None:
        last = self._last_polls.get(wid)
        error = last.error if isinstance(last, WorkerPoll) and last.error else None
        self._emit_worker("worker_failed", wid, reason=reason, error=error)
        self.group.kill(wid)

    def _emit_worker(self, event: str, wid: int, **fields: Any) -> None:
        self.events.emit(event, **self._describe(wid), **fields)

    def _describe(self, wid: int) -> dict[str, Any]:
        info = self.group.infos.get(wid)
        rank = self.members.index(wid) if wid in self.members else None
        return {"worker": wid, "rank": rank, "pid": info.pid if info else None,
                "node_id": info.node_id if info else None}

    def _fail(self, error: str, *, exit_code: int) -> Failed:
        return Failed(error=error, exit_code=exit_code)
