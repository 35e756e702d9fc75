"""Warm standby workers, kept on the nodes that host ranks, so that a dead rank's replacement has
already imported torch and loaded the training function.

A standby reserves no CPU or GPU: it starts at idle priority next to the training ranks. When it is
promoted it takes a reservation of a worker's resources on its own node, in the background, so the
reservation never holds the new rank back: a placement group pinned to the node, or a _Slot actor
where Ray must name the GPUs (Reservation). Standbys are numbered from
STANDBY_IDS, apart from workers; a promoted one keeps its number.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Callable
from typing import Any

import ray
from ray.util import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from elastic.config import RunConfig
from elastic._internal.protocol import WorkerInfo

STANDBY_IDS = 1_000_000
"""Standbys are numbered from here (a promoted one keeps its number)."""


class _Slot:
    """Holds a worker's CPU/GPU reservation for a promoted standby (which reserves none itself)."""

    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]


RemoteSlot = ray.remote(_Slot)

NODE_LABEL = "ray.io/node-id"
"""The label Ray gives every node, its id: what pins a placement group's bundle to one node."""
LABELS_TRUSTED_FROM = (2, 60)
"""The Ray release (the one CI tests, tests/test_hsdp.py) from which a bundle's label selector is
trusted to place it: earlier releases with the parameter ignored it in bundle scheduling (ray#55590)
or under STRICT_PACK (ray#60170). Before it, a reservation is a _Slot actor placed by node affinity."""


def _pins_bundles() -> bool:
    try:
        release = tuple(int(x) for x in ray.__version__.split(".")[:2])
    except ValueError:
        return False
    return release >= LABELS_TRUSTED_FROM and "bundle_label_selector" in inspect.signature(placement_group).parameters


class Reservation:
    """A worker's resources on one node, held for a promoted standby.

    Without GPUs, a placement group: the _Slot actor it replaces is a Ray worker process, whose start
    (about 1 CPU-second of Python and `import ray` at nice 0, above the training ranks' nice 15: Ray
    lowers a worker only once it runs) took most of a core from the recovery it was made in
    (sampled at 4 ranks on 2 cores: 0.9 CPU-s within 2 s of the kill). With GPUs, the _Slot actor:
    only a task or actor is told which GPUs Ray assigned."""

    def __init__(self, node: str, cpus: float, gpus: float) -> None:
        bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
        self._pg = self._actor = None
        if not bundle:
            return
        if gpus <= 0 and _pins_bundles():
            # PACK: one bundle is placed alone either way, and PACK schedules it with its labels.
            self._pg = placement_group([bundle], strategy="PACK", bundle_label_selector=[{NODE_LABEL: node}])
            return
        here = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        self._actor = RemoteSlot.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0,
                                         scheduling_strategy=here).remote()

    def gpu_ids(self, timeout_s: float) -> tuple[str, ...]:
        """The GPUs it holds (waits for it to be placed); () without GPUs."""
        if self._actor is None:
            return ()
        return tuple(ray.get(self._actor.gpu_ids.remote(), timeout=timeout_s))

    def release(self) -> None:
        if self._pg is not None:
            remove_placement_group(self._pg)
        if self._actor is not None:
            ray.kill(self._actor, no_restart=True)


class StandbyPool:
    """The standbys of one worker group: where each runs, when each was asked for and became ready
    (their median start-up sizes the pool), and the reservations of those promoted."""

    def __init__(self, worker_cls: Any, worker_opts: dict[str, Any], run: RunConfig, args: tuple) -> None:
        """`worker_opts`: a worker actor's options (a standby has them but reserves nothing);
        `args`: what each standby actor is constructed with (as a worker, in the background)."""
        self._cls = worker_cls
        self._opts = {**worker_opts, "num_cpus": 0, "num_gpus": 0}
        self._need = (run.scaling.cpus_per_worker, run.scaling.gpus_per_worker)  # a worker's CPUs, GPUs
        self._args = args
        self.per_node = run.scaling.standby_per_node
        """How many standbys each node keeps unless told otherwise."""
        self.nodes: dict[int, str] = {}
        """Standby wid -> its node (until it is promoted or forgotten)."""
        self._slots: dict[int, Reservation] = {}  # promoted standby wid -> its reservation
        self._started: dict[int, float] = {}  # standby wid -> when it was requested (until ready)
        self._ready_at: dict[int, float] = {}  # standby wid -> when the group saw it ready
        self._startups: list[float] = []  # measured standby start-ups, seconds
        self._next = 0

    def __contains__(self, wid: int) -> bool:
        return wid in self.nodes

    def start(self, node_ids: set[str], want: int, now: float) -> dict[int, Any]:
        """Ask for standbys until each of `node_ids` has `want`, ready or starting; the new ones'
        actors by id."""
        have: dict[str, int] = {}
        for node in self.nodes.values():
            have[node] = have.get(node, 0) + 1
        new = {}
        for node in node_ids:
            for _ in range(want - have.get(node, 0)):
                here = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
                wid = STANDBY_IDS + self._next  # ids of their own: workers keep 0, 1, 2, ...
                self._next += 1
                new[wid] = self._cls.options(**self._opts, scheduling_strategy=here).remote(*self._args)
                self.nodes[wid] = node
                self._started[wid] = now
        return new

    def seen_ready(self, wid: int, now: float) -> None:
        """The group saw `wid` ready at `now` (its start-up is counted at the next start())."""
        if wid in self._started:
            self._ready_at[wid] = now

    def count_startups(self, infos: dict[int, WorkerInfo], now: float) -> None:
        """Record the start-up (request to ready) of each standby that became ready since."""
        for wid in [w for w in self.nodes if w in infos and w in self._started]:
            self._startups.append(self._ready_at.pop(wid, now) - self._started.pop(wid))

    def ready(self, infos: dict[int, WorkerInfo], dead: Callable[[int], bool]) -> dict[str, int]:
        """node id -> a standby there that is ready to become a worker (and not known to be dead)."""
        return {node: wid for wid, node in sorted(self.nodes.items()) if wid in infos and not dead(wid)}

    def starting(self, infos: dict[int, WorkerInfo]) -> dict[str, int]:
        """node id -> how many of its standbys are not ready yet."""
        out: dict[str, int] = {}
        for wid, node in self.nodes.items():
            if wid not in infos:
                out[node] = out.get(node, 0) + 1
        return out

    def startup_s(self) -> float | None:
        """The median start-up of the standbys started so far (request to ready); None before one."""
        return statistics.median(self._startups) if self._startups else None

    def promote(self, wid: int) -> None:
        """`wid` becomes a worker: it reserves a worker's resources on its node (in the background)."""
        self._slots[wid] = Reservation(self.nodes.pop(wid), *self._need)

    def gpu_ids(self, wid: int, timeout_s: float) -> tuple[str, ...]:
        """The GPUs reserved for a promoted standby (waits for its reservation); () otherwise."""
        slot = self._slots.get(wid)
        return () if slot is None else slot.gpu_ids(timeout_s)

    def forget(self, wid: int) -> None:
        """Forget `wid` (killed, or dead before it was ready), and end its reservation if it had one."""
        self.nodes.pop(wid, None)
        self._started.pop(wid, None)
        self._ready_at.pop(wid, None)
        slot = self._slots.pop(wid, None)
        if slot is not None:
            slot.release()
