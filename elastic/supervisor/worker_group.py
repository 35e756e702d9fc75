"""The resizable set of worker actors, one per rank (plus spares and not-yet-placed requests).

Requests for the workers a run wants but cannot place yet stay queued in Ray: when a node joins
or a worker's CPU frees up, Ray places them and they show up here as ready. The controller only
sees worker ids; actors stay behind this class so that tests can swap in a fake group.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from elastic import compat
from elastic.config import RunConfig
from elastic.worker.devices import NCCL_ENV
from elastic.worker.protocol import Assignment, PollFailure, WorkerInfo, WorkerPoll


class WorkerGroup(Protocol):
    infos: dict[int, WorkerInfo]

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
    def ensure_standbys(self, node_ids: set[str]) -> None: ...
    def standbys(self) -> dict[str, int]: ...
    def promote(self, wid: int) -> None: ...
    def kill(self, wid: int) -> None: ...
    def placeable(self) -> int: ...
    def describe_resources(self) -> str: ...
    def shutdown(self) -> None: ...


STANDBY_IDS = 1_000_000
"""Standbys are numbered from here (a promoted one keeps its number)."""


class _Slot:
    """Holds a worker's CPU/GPU reservation for a promoted standby (which reserves none itself)."""

    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]


RemoteSlot = ray.remote(_Slot)


class RayWorkerGroup:
    def __init__(self, fn: Callable[[dict], Any], run: RunConfig, uri: str, *, lease_token: int = 0):
        from elastic.worker.actor import RemoteWorker

        self._need = run.scaling.resources_per_worker
        self._cls = RemoteWorker.options(
            num_cpus=run.scaling.cpus_per_worker,
            num_gpus=run.scaling.gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
            runtime_env={"env_vars": dict(NCCL_ENV)},
        )
        # A standby reserves nothing: it becomes a worker by taking a reservation (_Slot) of the
        # resources a worker needs, on its own node.
        self._standby_cls = RemoteWorker
        self._standby_opts = {"num_cpus": 0, "num_gpus": 0, "max_restarts": 0, "max_task_retries": 0,
                              "runtime_env": {"env_vars": dict(NCCL_ENV)}}
        self._slot_opts = {"num_cpus": run.scaling.cpus_per_worker, "num_gpus": run.scaling.gpus_per_worker,
                           "max_restarts": 0}
        self._standby_per_node = run.scaling.standby_per_node
        self._standby_nodes: dict[int, str] = {}  # standby wid -> its node
        self._slots: dict[int, Any] = {}  # promoted standby wid -> its reservation
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
            except RayActorError:
                self._actors.pop(wid, None)
                self._standby_nodes.pop(wid, None)
        return newly

    def pending(self) -> list[int]:
        return sorted(w for w in self._info_refs if w not in self._standby_nodes)

    def ready(self) -> list[int]:
        return sorted(w for w in self.infos if w not in self._standby_nodes)

    # -- standbys ----------------------------------------------------------------------------
    def ensure_standbys(self, node_ids: set[str]) -> None:
        """Keep standby_per_node standbys (ready or starting) on each of these nodes."""
        if self._standby_per_node <= 0:
            return
        have: dict[str, int] = {}
        for node in self._standby_nodes.values():
            have[node] = have.get(node, 0) + 1
        for node in node_ids:
            for _ in range(self._standby_per_node - have.get(node, 0)):
                here = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
                wid = STANDBY_IDS + self._next_standby  # ids of their own: workers keep 0, 1, 2, ...
                self._next_standby += 1
                actor = self._standby_cls.options(**self._standby_opts, scheduling_strategy=here).remote(
                    [self._fn_ref], self._run, self._uri, True, self._lease_token)
                self._actors[wid] = actor
                self._info_refs[wid] = actor.info.remote()
                self._standby_nodes[wid] = node

    def standbys(self) -> dict[str, int]:
        """node id -> a standby there that is ready to become a worker."""
        return {node: wid for wid, node in sorted(self._standby_nodes.items()) if wid in self.infos}

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
        refs = {wid: self._actors[wid].poll.remote() for wid in wids if wid in self._actors}
        out: dict[int, WorkerPoll | PollFailure] = {wid: PollFailure.DEAD for wid in wids if wid not in self._actors}
        if refs:
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for wid, ref in refs.items():
            try:
                out[wid] = ray.get(ref, timeout=0)
            except GetTimeoutError:
                out[wid] = PollFailure.UNRESPONSIVE
            except RayActorError:
                out[wid] = PollFailure.DEAD
        return out

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
        """Tell every worker (members, spares, those still starting) that its supervisor lives."""
        for actor in list(self._actors.values()):
            actor.heartbeat.remote()

    def draining_nodes(self) -> set[str]:
        """Ids of nodes Ray is draining (a preemption notice, an autoscaler scale-down)."""
        return compat.draining_node_ids() or set()

    def kill(self, wid: int) -> None:
        actor = self._actors.pop(wid, None)
        self._info_refs.pop(wid, None)
        self.infos.pop(wid, None)
        self._standby_nodes.pop(wid, None)
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

