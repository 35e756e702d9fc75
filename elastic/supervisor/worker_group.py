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
    def kill(self, wid: int) -> None: ...
    def placeable(self) -> int: ...
    def describe_resources(self) -> str: ...
    def shutdown(self) -> None: ...


_DRAINING = 3  # ray.rpc.NodeSnapshot.State.DRAINING


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
        # Serialized once; each actor gets the reference boxed and fetches it itself (WorkerActor).
        self._fn_ref = ray.put(fn)
        self._run = run
        self._uri = uri
        self._lease_token = lease_token
        self._actors: dict[int, Any] = {}
        self._info_refs: dict[int, ray.ObjectRef] = {}
        self.infos: dict[int, WorkerInfo] = {}
        self._next_id = 0

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
        return newly

    def pending(self) -> list[int]:
        return sorted(self._info_refs)

    def ready(self) -> list[int]:
        return sorted(self.infos)

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
        try:
            gcs = ray._private.worker.global_worker.gcs_client
            infos = gcs.get_all_node_info(timeout=2)
        except Exception:  # noqa: BLE001 - a private API: without it, SIGTERM still works
            return set()
        return {nid.hex() for nid, info in infos.items() if info.state_snapshot.state == _DRAINING}

    def kill(self, wid: int) -> None:
        actor = self._actors.pop(wid, None)
        self._info_refs.pop(wid, None)
        self.infos.pop(wid, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)

    def placeable(self) -> int:
        """How many more workers the cluster could place right now (beyond queued requests)."""
        avail = ray.available_resources()
        fits = min((math.floor(avail.get(k, 0.0) / v + 1e-9) for k, v in self._need.items() if v > 0), default=10**6)
        return max(0, fits - len(self._info_refs))

    def describe_resources(self) -> str:
        total = ray.cluster_resources()
        avail = ray.available_resources()
        parts = [f"{k}: {avail.get(k, 0):g} free of {total.get(k, 0):g}" for k in self._need]
        return ", ".join(parts)

    def shutdown(self) -> None:
        for wid in list(self._actors):
            self.kill(wid)

