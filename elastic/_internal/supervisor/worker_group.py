"""The resizable set of worker actors, one per rank (plus spares and not-yet-placed requests).

Requests for the workers a run wants but cannot place yet stay queued in Ray: when a node joins
or a worker's CPU frees up, Ray places them and they show up here as ready. The controller only
sees worker ids; actors stay behind this class so that tests can swap in a fake group.

This module holds the protocol and the actors' life (request, placement, assignment, kill); how
the supervisor hears from them is elastic._internal.supervisor.watches, the warm standbys
elastic._internal.supervisor.standby_pool.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Protocol

import ray
from ray import cloudpickle
from ray.exceptions import ActorUnschedulableError, RayActorError

from elastic._internal import compat
from elastic.config import RunConfig
from elastic._internal.protocol import Assignment, PollFailure, WorkerInfo, WorkerPoll
from elastic._internal.supervisor.standby_pool import StandbyPool
from elastic._internal.supervisor.watches import Watches
from elastic._internal.worker.devices import NCCL_ENV
from elastic._internal.worker.heap import ARENA_ENV


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
      ones (node id -> worker id), standbys_starting() counts those not ready yet per node,
      promote(wid) makes one a worker (in ready() from then on) and
      gpu_ids(wid) returns the GPUs its reservation holds (() for every other worker). A group
      that keeps none returns {} from standbys().
    - lost_nodes(node_ids): of these nodes, those the cluster reports dead or no longer lists; every
      standby there is forgotten at once (its workers are the controller's to drop).
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
    def lost_nodes(self, node_ids: set[str]) -> set[str]: ...
    def ensure_standbys(self, node_ids: set[str], *, per_node: int | None = None) -> None: ...
    def standbys(self) -> dict[str, int]: ...
    def standbys_starting(self) -> dict[str, int]: ...
    def standby_startup_s(self) -> float | None: ...
    def promote(self, wid: int) -> None: ...
    def gpu_ids(self, wid: int, timeout_s: float) -> tuple[str, ...]: ...
    def kill(self, wid: int) -> None: ...
    def placeable(self) -> int: ...
    def describe_resources(self) -> str: ...
    def shutdown(self) -> None: ...


def _own_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not connected to Ray: no node of its own
        return None


NODE_PROBE_S = 0.5
"""A node none of whose standbys answers a direct question within this is lost whole (lost_nodes)."""

WORKER_THREADS = 4
"""Threads of a worker actor: a watch waits in one while start, pause and stop calls use others."""


def _tell(method: str) -> Callable[[RayWorkerGroup, list[int]], None]:
    """A group method that sends `method` to each of the workers named that it still has, without
    waiting for an answer (request_pause, request_preempt, request_stop)."""

    def tell(self: RayWorkerGroup, wids: list[int]) -> None:
        for wid in wids:
            if wid in self._actors:
                getattr(self._actors[wid], method).remote()

    tell.__name__, tell.__qualname__ = method, f"RayWorkerGroup.{method}"
    return tell


class RayWorkerGroup:
    def __init__(self, fn: Callable[[dict], Any], run: RunConfig, *, lease_token: int = 0, worker_cls: Any = None):
        """`worker_cls`: the actor class (default elastic's worker; the scale harness passes
        stand-ins that speak the same protocol without torch)."""
        from elastic._internal.worker.actor import RemoteWorker

        worker_cls = worker_cls or RemoteWorker
        self._need = run.scaling.resources_per_worker
        # Threaded: a watch (long poll) waits in one thread while start/pause/stop calls go through.
        opts = {"num_cpus": run.scaling.cpus_per_worker, "num_gpus": run.scaling.gpus_per_worker,
                "max_restarts": 0, "max_task_retries": 0, "max_concurrency": WORKER_THREADS,
                "runtime_env": {"env_vars": {**NCCL_ENV, **ARENA_ENV}}}
        self._cls = worker_cls.options(**opts)
        # Pickled once, here; each actor gets the bytes boxed and unpickles them itself (WorkerActor).
        # Not a ray.put reference: every worker that fetched one holds a copy, and Ray may pull a
        # new actor's copy from a node that was just lost, holding its creation until that node is
        # declared dead. Bytes travel inside the creation task (or, when large, as an object the
        # supervisor puts for that one task), so replacements depend on the supervisor's node only.
        self._fn_box = [cloudpickle.dumps(fn)]
        self._run = run
        self._lease_token = lease_token
        self._actors: dict[int, Any] = {}
        self._info_refs: dict[int, ray.ObjectRef] = {}
        self.infos: dict[int, WorkerInfo] = {}
        self._next_id = 0
        self._watches = Watches(self._actors, run.failure.liveness_interval_s)
        # A standby reserves nothing: it becomes a worker by taking a reservation of the resources
        # a worker needs, on its own node.
        self._standbys = StandbyPool(worker_cls, opts, run, (self._fn_box, run, True, lease_token))
        self._generation: tuple[int, list[int]] = (-1, [])  # the latest generation started, and its members
        self._rehearsed: dict[int, int] = {}  # standby -> the generation whose optimizer step it rehearsed

    def request(self, n: int, *, background: bool = False) -> list[int]:
        """Ask for n more workers; `background`: others are training meanwhile, so these start at
        idle CPU priority (elastic._internal.worker.priority)."""
        ids = []
        for _ in range(n):
            wid = self._next_id
            self._next_id += 1
            actor = self._cls.remote(self._fn_box, self._run, background, self._lease_token)
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
                self._standbys.seen_ready(wid, time.monotonic())
            except (RayActorError, ActorUnschedulableError):
                # Dead before it was ready, or never placed (a standby or replacement pinned to a
                # node that is draining or gone): not a failure of the run, the worker is forgotten.
                self._actors.pop(wid, None)
                self._standbys.forget(wid)
        return newly

    def pending(self) -> list[int]:
        return sorted(w for w in self._info_refs if w not in self._standbys)

    def ready(self) -> list[int]:
        return sorted(w for w in self.infos if w not in self._standbys)

    # -- standbys (elastic._internal.supervisor.standby_pool) -----------------------------------------
    def ensure_standbys(self, node_ids: set[str], *, per_node: int | None = None) -> None:
        """Keep `per_node` (default standby_per_node) standbys, ready or starting, on each of these
        nodes. A standby that died (a kill, an OOM) no longer counts: each ready one keeps a watch
        outstanding, which Ray fails when it dies, and it is replaced here."""
        want = self._standbys.per_node if per_node is None else per_node
        if want <= 0:
            return
        now = time.monotonic()
        self._watches.harvest(now)
        for wid in [w for w in self._standbys.nodes if w in self.infos]:
            if self._watches.is_dead(wid):
                self.kill(wid)  # forget it: its node gets a new one below
            elif not self._watches.watching(wid) and wid in self._actors:
                self._watches.watch(wid)
        self._standbys.count_startups(self.infos, now)
        for wid, actor in self._standbys.start(node_ids, want, now).items():
            self._actors[wid] = actor
            self._info_refs[wid] = actor.info.remote()
        self._rehearse_standbys()

    def _rehearse_standbys(self) -> None:
        """Each ready standby rehearses the running generation's optimizer step once (its DTensor
        layout, from a member: worker/rehearsal.py), so that its first step as a newcomer finds
        DTensor's sharding worked out. The layout travels as a reference from the member's call
        straight to the standbys': the supervisor waits for neither."""
        gen, members = self._generation
        due = [w for w in self._standbys.nodes if w in self.infos and w in self._actors
               and self._rehearsed.get(w) != gen]
        source = next((w for w in members if w in self._actors and w not in self._standbys), None)
        if not due or source is None:
            return
        layout = self._actors[source].layout.remote()
        for wid in due:
            self._actors[wid].rehearse.remote(layout)
            self._rehearsed[wid] = gen
        for wid in [w for w in self._rehearsed if w not in self._standbys.nodes]:
            del self._rehearsed[wid]

    def standbys(self) -> dict[str, int]:
        """node id -> a standby there that is ready to become a worker (and not known to be dead:
        the watches that failed by now are taken in first, so a standby that died with its node a
        moment ago is not offered for promotion)."""
        self._watches.harvest(time.monotonic())
        return self._standbys.ready(self.infos, self._watches.is_dead)

    def standbys_starting(self) -> dict[str, int]:
        """node id -> how many standbys there are still starting (asked for, not ready yet)."""
        return self._standbys.starting(self.infos)

    def standby_startup_s(self) -> float | None:
        """The median start-up of the standbys started so far (request to ready); None before one."""
        return self._standbys.startup_s()

    def promote(self, wid: int) -> None:
        """Make a ready standby a worker: it reserves a worker's resources on its node (placed in
        the background: the reservation does not hold the worker back)."""
        self._standbys.promote(wid)

    def gpu_ids(self, wid: int, timeout_s: float) -> tuple[str, ...]:
        """The GPUs reserved for a promoted standby (waits for its reservation); () otherwise."""
        return self._standbys.gpu_ids(wid, timeout_s)

    # -- running ------------------------------------------------------------------------------
    def start(self, assignments: dict[int, Assignment], timeout_s: float) -> list[int]:
        """Hand each worker its place in a new generation; the ids that did not accept it."""
        if assignments:
            self._generation = (max(a.generation for a in assignments.values()), sorted(assignments))
        refs = {wid: self._actors[wid].start.remote(a) for wid, a in assignments.items() if wid in self._actors}
        for wid in refs:
            self._watches.forget(wid)  # its answers from the previous generation say nothing about this one
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
        return self._watches.answers(wids, timeout_s)

    request_pause = _tell("request_pause")
    request_preempt = _tell("request_preempt")
    request_stop = _tell("request_stop")

    def heartbeat(self) -> None:
        """Tell every worker without a watch outstanding (spares, standbys, those still starting)
        that its supervisor lives; a watch tells the others."""
        for wid, actor in list(self._actors.items()):
            if not self._watches.watching(wid):
                actor.heartbeat.remote()

    def draining_nodes(self) -> set[str]:
        """Ids of nodes Ray is draining (a preemption notice, an autoscaler scale-down)."""
        return compat.draining_node_ids() or set()

    def lost_nodes(self, node_ids: set[str]) -> set[str]:
        """Of these nodes, those lost whole (a spot VM reclaimed): Ray's node table reports them dead
        or no longer lists them, or none of their ready standbys answers a direct question within
        NODE_PROBE_S (a node's Ray workers exit within a second of its raylet; Ray marks the node
        dead only once its health checks fail: health_check_period_ms x health_check_failure_threshold,
        about 15 s by default). Every standby there is forgotten at once, so that none is promoted."""
        if not node_ids:
            return set()
        try:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        except Exception:  # noqa: BLE001 - the node table unreadable: only the standbys can tell
            alive = set(node_ids)
        lost = {n for n in node_ids if n not in alive} | self._silent_nodes(node_ids & alive)
        for wid in [w for w, node in self._standbys.nodes.items() if node in lost]:
            self.kill(wid)
        return lost

    def _silent_nodes(self, node_ids: set[str]) -> set[str]:
        """Of these nodes, those with ready standbys of which none answers within NODE_PROBE_S. The
        node this supervisor runs on is alive by definition: a standby there that is slow to answer
        (2 busy cores) must never make its node's healthy ranks count as lost."""
        node_ids = node_ids - {_own_node_id()}
        asked = {wid: node for wid, node in self._standbys.nodes.items()
                 if node in node_ids and wid in self.infos and wid in self._actors}
        if not asked:
            return set()
        refs = {self._actors[wid].info.remote(): wid for wid in asked if not self._watches.is_dead(wid)}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=NODE_PROBE_S) if refs else ([], [])
        answered = set()
        for ref in done:
            try:
                ray.get(ref, timeout=0)
                answered.add(asked[refs[ref]])
            except Exception:  # noqa: BLE001 - dead: no answer from it
                pass
        return set(asked.values()) - answered

    def kill(self, wid: int) -> None:
        self._watches.drop(wid)
        actor = self._actors.pop(wid, None)
        self._info_refs.pop(wid, None)
        self.infos.pop(wid, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)
        self._standbys.forget(wid)

    # -- the cluster --------------------------------------------------------------------------
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
