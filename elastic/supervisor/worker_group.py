"""The resizable set of worker actors, one per rank (plus spares and not-yet-placed requests).

Requests for the workers a run wants but cannot place yet stay queued in Ray: when a node joins
or a worker's CPU frees up, Ray places them and they show up here as ready. The controller only
sees worker ids; actors stay behind this class so that tests can swap in a fake group.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from elastic import compat
from elastic.config import RunConfig
from elastic.protocol import Assignment, PollFailure, WorkerInfo, WorkerPoll
from elastic.worker.devices import NCCL_ENV


class WorkerGroup(Protocol):
    """What the controller drives: workers known by integer ids, never by their actors. Every
    implementation runs through tests/test_worker_group_conformance.py.

    - request(n) asks for n workers; their ids are new (never reused) and pending() until placed;
      refresh() collects the newly ready ones into ready() (sorted) and `infos`. A request the
      cluster has no room for stays queued until room appears.
    - start(assignments) hands each worker its generation; it returns the ids that did not take it
      (gone, refused): the controller never builds a group with them.
    - poll(wids) answers for exactly the ids asked: a WorkerPoll (events delivered once), or a
      PollFailure (DEAD: gone or killed; UNRESPONSIVE: no answer within timeout_s).
    - request_pause / request_preempt / request_stop: running workers leave at a step boundary
      (parked, ParkReason.PAUSE) or finish; kill(wid) ends a worker and forgets it.
    - Standbys are not workers: ensure_standbys keeps them on nodes, standbys() lists the ready
      ones (node id -> worker id), promote(wid) makes one a worker (in ready() from then on) and
      gpu_ids(wid) returns the GPUs its reservation holds (() for every other worker). A group
      that keeps none returns {} from standbys().
    """

    infos: dict[int, WorkerInfo]
    """Worker id -> where it runs, for each ready worker and standby."""

    def request(self, n: int, *, background: bool = False) -> list[int]: ...
    def refresh(self) -> list[int]: ...
    def pending(self) -> list[int]: ...
    def ready(self) -> list[int]: ...
    def start(self, assignments: dict[int, Assignment], timeout_s: float) -> list[int]: ...
    def poll(self, wids: list[int], timeout_s: float) -> dict[int, WorkerPoll | PollFailure]: ...
    def request_pause(self, wids: list[int]) -> None: ...
    def request_preempt(self, wids: list[int]) -> None: ...
    def request_stop(self, wids: list[int]) -> None: ...
    def draining_nodes(self) -> set[str]: ...
    def ensure_standbys(self, node_ids: set[str], *, per_node: int | None = None) -> None: ...
    def standbys(self) -> dict[str, int]: ...
    def standby_startup_s(self) -> float | None: ...
    def promote(self, wid: int) -> None: ...
    def gpu_ids(self, wid: int, timeout_s: float) -> tuple[str, ...]: ...
    def kill(self, wid: int) -> None: ...
    def placeable(self) -> int: ...
    def describe_resources(self) -> str: ...
    def shutdown(self) -> None: ...


WORKER_THREADS = 4
"""Threads of a worker actor: a watch waits in one while start, pause and stop calls use others."""
STANDBY_IDS = 1_000_000
"""Standbys are numbered from here (a promoted one keeps its number)."""


@dataclasses.dataclass(frozen=True)
class _Watch:
    ref: Any
    issued: float


def _aged(poll: WorkerPoll | PollFailure, elapsed: float) -> WorkerPoll | PollFailure:
    """An answer `elapsed` seconds old, with its ages as they are now (what hang detection reads)."""
    if not isinstance(poll, WorkerPoll) or elapsed < 0.05:
        return poll
    waiting = poll.waiting_in_collective_s
    return dataclasses.replace(poll, progress_age_s=poll.progress_age_s + elapsed,
                               waiting_in_collective_s=None if waiting is None else waiting + elapsed)


class Inbox:
    """Events and metrics records on their way from the workers to the controller, each delivered
    exactly once although answers may be lost or come twice (elastic.worker.status numbers them)."""

    def __init__(self) -> None:
        self._acks: dict[int, tuple[int, int]] = {}
        """wid -> the newest (event, record) sequence numbers taken in: sent with each question, so
        that the worker drops only what arrived."""
        self._held: dict[int, tuple[list, list]] = {}
        """wid -> events and records taken in and not handed to the controller yet."""

    def ack(self, wid: int) -> tuple[int, int]:
        return self._acks.get(wid, (0, 0))

    def take(self, wid: int, poll: WorkerPoll) -> WorkerPoll:
        """Keep what `poll` carries that is new; returns it without events and records."""
        ev_have, rec_have = self.ack(wid)
        events = poll.events[max(0, ev_have - poll.event_seq + 1):]
        records = poll.records[max(0, rec_have - poll.record_seq + 1):]
        self._acks[wid] = (max(ev_have, poll.event_seq + len(poll.events) - 1),
                           max(rec_have, poll.record_seq + len(poll.records) - 1))
        if events or records:
            held = self._held.setdefault(wid, ([], []))
            held[0].extend(events)
            held[1].extend(records)
        return dataclasses.replace(poll, events=[], records=[]) if (poll.events or poll.records) else poll

    def deliver(self, wid: int, answer: WorkerPoll | PollFailure) -> WorkerPoll | PollFailure:
        """`answer` with what is held for this worker (handed over once; kept for a later answer
        when this one is a failure)."""
        if not isinstance(answer, WorkerPoll) or wid not in self._held:
            return answer
        events, records = self._held.pop(wid)
        return dataclasses.replace(answer, events=events, records=records)

    def drop(self, wid: int) -> None:
        self._acks.pop(wid, None)
        self._held.pop(wid, None)


class _Slot:
    """Holds a worker's CPU/GPU reservation for a promoted standby (which reserves none itself)."""

    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]


RemoteSlot = ray.remote(_Slot)


class RayWorkerGroup:
    def __init__(self, fn: Callable[[dict], Any], run: RunConfig, uri: str, *, lease_token: int = 0,
                 worker_cls: Any = None):
        """`worker_cls`: the actor class (default elastic's worker; the scale harness passes
        stand-ins that speak the same protocol without torch)."""
        from elastic.worker.actor import RemoteWorker

        worker_cls = worker_cls or RemoteWorker
        self._need = run.scaling.resources_per_worker
        # Threaded: a watch (long poll) waits in one thread while start/pause/stop calls go through.
        self._cls = worker_cls.options(
            num_cpus=run.scaling.cpus_per_worker,
            num_gpus=run.scaling.gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=WORKER_THREADS,
            runtime_env={"env_vars": dict(NCCL_ENV)},
        )
        # A standby reserves nothing: it becomes a worker by taking a reservation (_Slot) of the
        # resources a worker needs, on its own node.
        self._standby_cls = worker_cls
        self._standby_opts = {"num_cpus": 0, "num_gpus": 0, "max_restarts": 0, "max_task_retries": 0,
                              "max_concurrency": WORKER_THREADS, "runtime_env": {"env_vars": dict(NCCL_ENV)}}
        self._liveness_s = run.failure.liveness_interval_s
        self._watches: dict[int, _Watch] = {}
        self._by_ref: dict[ray.ObjectRef, int] = {}
        self._latest: dict[int, tuple[WorkerPoll | PollFailure, float]] = {}
        """wid -> (the newest answer, without its events and records; when it came)."""
        self._versions: dict[int, int] = {}
        self._inbox = Inbox()
        self._slot_opts = {"num_cpus": run.scaling.cpus_per_worker, "num_gpus": run.scaling.gpus_per_worker,
                           "max_restarts": 0}
        self._standby_per_node = run.scaling.standby_per_node
        self._standby_nodes: dict[int, str] = {}  # standby wid -> its node
        self._slots: dict[int, Any] = {}  # promoted standby wid -> its reservation
        self._standby_started: dict[int, float] = {}  # standby wid -> when it was requested (until ready)
        self._standby_ready_at: dict[int, float] = {}  # standby wid -> when refresh() saw it ready
        self._startups: list[float] = []  # measured standby start-ups, seconds
        # Serialized once; each actor gets the reference boxed and fetches it itself (WorkerActor).
        self._fn_ref = ray.put(fn)
        self._run = run
        self._uri = uri
        self._lease_token = lease_token
        self._actors: dict[int, Any] = {}
        self._info_refs: dict[int, ray.ObjectRef] = {}
        self.infos: dict[int, WorkerInfo] = {}
        self._next_id = 0
        self._next_standby = 0

    def request(self, n: int, *, background: bool = False) -> list[int]:
        """Ask for n more workers; `background`: others are training meanwhile, so these start at
        idle CPU priority (elastic.worker.priority)."""
        ids = []
        for _ in range(n):
            wid = self._next_id
            self._next_id += 1
            actor = self._cls.remote([self._fn_ref], self._run, self._uri, background, self._lease_token)
            self._actors[wid] = actor
            self._info_refs[wid] = actor.info.remote()
            ids.append(wid)
        return ids

    def refresh(self) -> list[int]:
        """Collect workers that became ready; returns their ids."""
        if not self._info_refs:
            return []
        refs = list(self._info_refs.values())
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done_set = set(done)
        newly = []
        for wid, ref in list(self._info_refs.items()):
            if ref not in done_set:
                continue
            del self._info_refs[wid]
            try:
                self.infos[wid] = ray.get(ref)
                newly.append(wid)
                if wid in self._standby_started:
                    self._standby_ready_at[wid] = time.monotonic()
            except RayActorError:
                self._actors.pop(wid, None)
                self._standby_nodes.pop(wid, None)
        return newly

    def pending(self) -> list[int]:
        return sorted(w for w in self._info_refs if w not in self._standby_nodes)

    def ready(self) -> list[int]:
        return sorted(w for w in self.infos if w not in self._standby_nodes)

    # -- standbys ----------------------------------------------------------------------------
    def ensure_standbys(self, node_ids: set[str], *, per_node: int | None = None) -> None:
        """Keep `per_node` (default standby_per_node) standbys, ready or starting, on each of these
        nodes. A standby that died (a kill, an OOM) no longer counts: each ready one keeps a watch
        outstanding, which Ray fails when it dies, and it is replaced here."""
        want = self._standby_per_node if per_node is None else per_node
        if want <= 0:
            return
        now = time.monotonic()
        self._harvest(now)
        for wid in [w for w in self._standby_nodes if w in self.infos]:
            latest = self._latest.get(wid)
            if latest is not None and latest[0] is PollFailure.DEAD:
                self.kill(wid)  # forget it: its node gets a new one below
            elif wid not in self._watches and wid in self._actors:
                self._watch(wid)
        for wid in [w for w in self._standby_nodes if w in self.infos and w in self._standby_started]:
            self._startups.append(self._standby_ready_at.pop(wid, now) - self._standby_started.pop(wid))
        have: dict[str, int] = {}
        for node in self._standby_nodes.values():
            have[node] = have.get(node, 0) + 1
        for node in node_ids:
            for _ in range(want - have.get(node, 0)):
                here = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
                wid = STANDBY_IDS + self._next_standby  # ids of their own: workers keep 0, 1, 2, ...
                self._next_standby += 1
                actor = self._standby_cls.options(**self._standby_opts, scheduling_strategy=here).remote(
                    [self._fn_ref], self._run, self._uri, True, self._lease_token)
                self._actors[wid] = actor
                self._info_refs[wid] = actor.info.remote()
                self._standby_nodes[wid] = node
                self._standby_started[wid] = now

    def standbys(self) -> dict[str, int]:
        """node id -> a standby there that is ready to become a worker (and not known to be dead)."""
        return {node: wid for wid, node in sorted(self._standby_nodes.items())
                if wid in self.infos and self._latest.get(wid, (None,))[0] is not PollFailure.DEAD}

    def standby_startup_s(self) -> float | None:
        """The median start-up of the standbys started so far (request to ready); None before one."""
        return statistics.median(self._startups) if self._startups else None

    def promote(self, wid: int) -> None:
        """Make a ready standby a worker: it reserves a worker's resources on its node (placed in
        the background: the reservation does not hold the worker back)."""
        node = self._standby_nodes.pop(wid)
        here = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        self._slots[wid] = RemoteSlot.options(**self._slot_opts, scheduling_strategy=here).remote()

    def gpu_ids(self, wid: int, timeout_s: float) -> tuple[str, ...]:
        """The GPUs reserved for a promoted standby (waits for its reservation); () otherwise."""
        slot = self._slots.get(wid)
        if slot is None:
            return ()
        return tuple(ray.get(slot.gpu_ids.remote(), timeout=timeout_s))

    def start(self, assignments: dict[int, Assignment], timeout_s: float) -> list[int]:
        """Hand each worker its place in a new generation; the ids that did not accept it."""
        refs = {wid: self._actors[wid].start.remote(a) for wid, a in assignments.items() if wid in self._actors}
        for wid in refs:
            self._forget(wid)  # its answers from the previous generation say nothing about this one
        failed = [wid for wid in assignments if wid not in refs]
        if refs:
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for wid, ref in refs.items():
            try:
                ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - dead, refused or too slow: the worker is lost
                failed.append(wid)
        return failed

    def poll(self, wids: list[int], timeout_s: float) -> dict[int, WorkerPoll | PollFailure]:
        """What each worker last said. Push before poll: every worker has one watch (a long poll)
        outstanding, which it answers when it has news and at least every liveness_interval_s;
        Ray fails it at once when the worker dies. A worker with no answer yet (just started, or
        assigned a new generation) is asked directly within timeout_s; one whose watch is older
        than liveness_interval_s + timeout_s / 2 is asked within the other half. Unanswered, it is
        frozen (UNRESPONSIVE)."""
        now = time.monotonic()
        self._harvest(now)
        out: dict[int, WorkerPoll | PollFailure] = {}
        ask, overdue = [], []  # no answer yet; a watch overdue: each asked directly
        for wid in wids:
            if wid not in self._actors:
                out[wid] = PollFailure.DEAD
                continue
            if wid not in self._watches and not isinstance(self._latest.get(wid, (None,))[0], PollFailure):
                self._watch(wid)
            latest = self._latest.get(wid)
            if latest is None:
                ask.append(wid)
                continue
            w = self._watches.get(wid)
            if w is not None and now - w.issued > self._liveness_s + timeout_s / 2:
                # Overdue. A loaded machine can delay one answer (a watch waits behind the worker's
                # other calls): a direct question decides, within the other half of timeout_s, so
                # a frozen worker is still found within liveness_interval_s + timeout_s.
                overdue.append(wid)
                continue
            answer, at = latest
            out[wid] = self._inbox.deliver(wid, _aged(answer, now - at))
        if ask or overdue:
            out.update(self._ask(ask, timeout_s, overdue, timeout_s / 2))
        return out

    def _watch(self, wid: int) -> None:
        latest = self._latest.get(wid)
        last = latest[0] if latest is not None else None
        version = self._versions.get(wid, -1)
        step = last.step if isinstance(last, WorkerPoll) else -1
        ref = self._actors[wid].watch.remote(version, step, self._liveness_s, self._inbox.ack(wid))
        self._watches[wid] = _Watch(ref, time.monotonic())
        self._by_ref[ref] = wid

    def _harvest(self, now: float) -> None:
        """Take in every watch that answered (or failed) since the last look; re-arm them."""
        if not self._watches:
            return
        refs = [w.ref for w in self._watches.values()]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            wid = self._by_ref.pop(ref)
            self._watches.pop(wid, None)
            try:
                version, poll = ray.get(ref, timeout=0)
            except RayActorError:
                self._latest[wid] = (PollFailure.DEAD, now)
                continue
            except Exception:  # noqa: BLE001 - a watch that failed otherwise: ask again next time
                continue
            self._versions[wid] = version
            self._keep(wid, poll, now)
            if wid in self._actors:
                self._watch(wid)

    def _keep(self, wid: int, poll: WorkerPoll, now: float) -> None:
        """Store a worker's newest answer (its events and records wait in the inbox)."""
        self._latest[wid] = (self._inbox.take(wid, poll), now)

    def _ask(self, wids: list[int], timeout_s: float, overdue: tuple[int, ...] | list[int] = (),
             overdue_timeout_s: float = 0.0) -> dict[int, WorkerPoll | PollFailure]:
        """Ask `wids` (within timeout_s) and `overdue` (within overdue_timeout_s) directly."""
        refs = {wid: self._actors[wid].poll.remote(self._inbox.ack(wid)) for wid in [*wids, *overdue]}
        t0 = time.monotonic()
        if overdue:
            ray.wait([refs[w] for w in overdue], num_returns=len(overdue), timeout=overdue_timeout_s)
        if wids:
            ray.wait([refs[w] for w in wids], num_returns=len(wids), timeout=max(0.0, timeout_s - (time.monotonic() - t0)))
        out: dict[int, WorkerPoll | PollFailure] = {}
        now = time.monotonic()
        for wid, ref in refs.items():
            try:
                self._keep(wid, ray.get(ref, timeout=0), now)
                out[wid] = self._inbox.deliver(wid, self._latest[wid][0])
                w = self._watches.get(wid)
                if w is not None:  # it answered: its watch, if overdue, counts from now
                    self._watches[wid] = _Watch(w.ref, now)
            except GetTimeoutError:
                out[wid] = PollFailure.UNRESPONSIVE
            except RayActorError:
                out[wid] = PollFailure.DEAD
                self._latest[wid] = (PollFailure.DEAD, now)
        return out

    def _forget(self, wid: int) -> None:
        """Drop what a worker said before (it was given a new generation). Its events and records
        are kept: those taken in wait here, the rest wait unacknowledged on the worker (a watch
        still in flight is never looked at, and the next answer carries what it took)."""
        self._latest.pop(wid, None)
        self._versions.pop(wid, None)
        w = self._watches.pop(wid, None)
        if w is not None:
            self._by_ref.pop(w.ref, None)

    def request_pause(self, wids: list[int]) -> None:
        for wid in wids:
            if wid in self._actors:
                self._actors[wid].request_pause.remote()

    def request_preempt(self, wids: list[int]) -> None:
        for wid in wids:
            if wid in self._actors:
                self._actors[wid].request_preempt.remote()

    def request_stop(self, wids: list[int]) -> None:
        for wid in wids:
            if wid in self._actors:
                self._actors[wid].request_stop.remote()

    def heartbeat(self) -> None:
        """Tell every worker without a watch outstanding (spares, standbys, those still starting)
        that its supervisor lives; a watch tells the others."""
        watched = set(self._watches)
        for wid, actor in list(self._actors.items()):
            if wid not in watched:
                actor.heartbeat.remote()

    def draining_nodes(self) -> set[str]:
        """Ids of nodes Ray is draining (a preemption notice, an autoscaler scale-down)."""
        return compat.draining_node_ids() or set()

    def kill(self, wid: int) -> None:
        self._forget(wid)
        self._inbox.drop(wid)
        actor = self._actors.pop(wid, None)
        self._info_refs.pop(wid, None)
        self.infos.pop(wid, None)
        self._standby_nodes.pop(wid, None)
        self._standby_started.pop(wid, None)
        self._standby_ready_at.pop(wid, None)
        slot = self._slots.pop(wid, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)
        if slot is not None:
            ray.kill(slot, no_restart=True)

    def placeable(self) -> int:
        """How many more workers the cluster could place right now (beyond queued requests and the
        reservations of promoted standbys not placed yet)."""
        avail = ray.available_resources()
        fits = min((math.floor(avail.get(k, 0.0) / v + 1e-9) for k, v in self._need.items() if v > 0), default=10**6)
        return max(0, fits - len(self.pending()))

    def describe_resources(self) -> str:
        total = ray.cluster_resources()
        avail = ray.available_resources()
        parts = [f"{k}: {avail.get(k, 0):g} free of {total.get(k, 0):g}" for k in self._need]
        return ", ".join(parts)

    def shutdown(self) -> None:
        for wid in list(self._actors):
            self.kill(wid)

