"""A worker group of N simulated workers, in memory: the control plane's scale harness.

It implements the WorkerGroup protocol the controller drives (elastic._internal.supervisor.worker_group), so
the real controller and policies run unchanged against 100, 1,000 or 10,000 "workers" with an
injected clock, no Ray and no torch (scripts/bench_control_plane.py, tests/test_control_plane.py).

Workers live on nodes of `per_node` workers each. A running group advances one step per poll round;
scripted faults: a worker dies at a step (`die_at`), a whole node is lost (`remove_node`), capacity
grows (`add_nodes`). Answers for the many workers in the same situation are one shared immutable
WorkerPoll, as the real group returns cached answers for workers with nothing new to say.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from elastic._internal.protocol import Assignment, ParkReason, PollFailure, Restored, WorkerInfo, WorkerPoll, WorkerState


class ManualClock:
    """The controller's clock in a simulation: time moves only when the controller sleeps."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt


class SimulatedGroup:
    def __init__(self, capacity: int, *, per_node: int = 8, steps: int = 10**9,
                 wall: Callable[[], float] = time.perf_counter):
        self.capacity = capacity
        self.per_node = per_node
        self.steps = steps
        self.wall = wall
        self.infos: dict[int, WorkerInfo] = {}
        self._pending: list[int] = []
        self._next = 0
        self._node_of: dict[int, int] = {}
        self._gen: dict[int, int] = {}
        self._state: dict[int, WorkerState] = {}
        self._park: dict[int, ParkReason] = {}
        self._events: dict[int, list[dict[str, Any]]] = {}
        self._restored: dict[int, Restored] = {}  # what a worker restored in its latest generation
        self.step = 0
        self.dead: set[int] = set()
        self.removed_nodes: set[int] = set()
        self.die_at: dict[int, int] = {}
        self.at_step: dict[int, Callable[[], Any]] = {}
        """Scripted actions, run once when the group first reaches the step (remove_node, add_nodes)."""
        self.marks: dict[str, float] = {}
        """Wall times of what the harness measures: `observable` (a death first shows in a poll),
        `ordered` (the next group's assignments handed out)."""
        self.starts = 0
        self.assigned = 0
        self._cache: dict[tuple, WorkerPoll] = {}

    # -- placement -----------------------------------------------------------------------------
    def request(self, n: int, *, background: bool = False) -> list[int]:
        ids = list(range(self._next, self._next + n))
        self._next += n
        self._pending += ids
        return ids

    def refresh(self) -> list[int]:
        room = self.capacity - len(self.infos)
        newly = self._pending[:max(0, room)]
        del self._pending[:len(newly)]
        for wid in newly:
            node = len(self._node_of) // self.per_node
            self._node_of[wid] = node
            self.infos[wid] = WorkerInfo(pid=100_000 + wid, node_id=f"node{node:05d}", ip="10.0.0.1")
        return newly

    def pending(self) -> list[int]:
        return list(self._pending)

    def ready(self) -> list[int]:
        return sorted(self.infos)

    def placeable(self) -> int:
        return max(0, self.capacity - len(self.infos) - len(self._pending))

    def describe_resources(self) -> str:
        return f"{self.capacity} simulated slots"

    # -- a generation --------------------------------------------------------------------------
    def start(self, assignments: dict[int, Assignment], timeout_s: float) -> list[int]:
        self.marks.setdefault("ordered", self.wall())
        self.starts += 1
        self.assigned += len(assignments)
        for wid, a in assignments.items():
            self._gen[wid] = a.generation
            self._state[wid] = WorkerState.RUNNING
            self._park.pop(wid, None)
        if assignments:  # rank 0 says where the group restored from (as every real rank does)
            first = next(iter(assignments))
            g = assignments[first].generation
            self._events[first] = [{"event": "restored", "step": self.step, "generation": g, "source": "memory",
                                    "lost_steps": 0, "time": time.time()}]
            self._restored[first] = Restored(generation=g, step=self.step)
        return [w for w in assignments if w in self.dead]

    def poll(self, wids: list[int], timeout_s: float) -> dict[int, WorkerPoll | PollFailure]:
        running = [w for w in wids if self._state.get(w) is WorkerState.RUNNING and w not in self.dead]
        if running:
            for w in running:
                if self.die_at.get(w) == self.step:
                    self.dead.add(w)
                    self.marks.setdefault("observable", self.wall())
            if any(w in self.dead for w in wids):  # a dead peer breaks the group for everyone
                for w in running:
                    if w not in self.dead:
                        self._state[w] = WorkerState.PARKED
                        self._park[w] = ParkReason.BROKEN
            else:
                self.step += 1
                if (action := self.at_step.pop(self.step, None)) is not None:
                    action()
                if self.step >= self.steps:
                    for w in running:
                        self._state[w] = WorkerState.FINISHED
        out: dict[int, WorkerPoll | PollFailure] = {}
        for w in wids:
            if w in self.dead or w not in self.infos:
                out[w] = PollFailure.DEAD
                continue
            events = self._events.pop(w, None)
            key = (self._state.get(w, WorkerState.IDLE), self._gen.get(w, -1), self.step, self._park.get(w),
                   self._restored.get(w))
            poll = self._cache.get(key)
            if poll is None or events:
                poll = WorkerPoll(state=key[0], generation=key[1], step=self.step, progress_age_s=0.0,
                                  waiting_in_collective_s=None, metrics={"loss": 1.0}, events=events or [],
                                  park_reason=key[3], restored=key[4])
                if not events:
                    if len(self._cache) > 64:
                        self._cache.clear()
                    self._cache[key] = poll
            out[w] = poll
        return out

    def request_pause(self, wids: list[int]) -> None:
        for w in wids:
            if self._state.get(w) is WorkerState.RUNNING:
                self._state[w] = WorkerState.PARKED
                self._park[w] = ParkReason.PAUSE

    def request_preempt(self, wids: list[int]) -> None:
        self.request_pause(wids)

    def request_stop(self, wids: list[int]) -> None:
        self.request_pause(wids)

    # -- faults --------------------------------------------------------------------------------
    def remove_node(self, node: int) -> list[int]:
        """Every worker of `node` dies at once (a lost spot VM); its slots are gone too."""
        lost = [w for w, n in self._node_of.items() if n == node and w in self.infos]
        self.dead.update(lost)
        self.removed_nodes.add(node)
        self.capacity -= len(lost)
        self.marks.setdefault("observable", self.wall())
        return lost

    def add_nodes(self, n: int) -> None:
        self.capacity += n * self.per_node

    def draining_nodes(self) -> set[str]:
        return set()

    def lost_nodes(self, node_ids: set[str]) -> set[str]:
        return {n for n in node_ids if n in {f"node{k:05d}" for k in self.removed_nodes}}

    def kill(self, wid: int) -> None:
        self.infos.pop(wid, None)
        self.dead.add(wid)
        if wid in self._pending:
            self._pending.remove(wid)

    def shutdown(self) -> None:
        pass

    def ensure_standbys(self, node_ids: set[str], *, per_node: int | None = None) -> None:
        pass

    def standby_startup_s(self) -> float | None:
        return None

    def standbys(self) -> dict[str, int]:
        return {}

    def standbys_starting(self) -> dict[str, int]:
        return {}

    def promote(self, wid: int) -> None:
        raise AssertionError("the simulated group keeps no standbys")

    def gpu_ids(self, wid: int, timeout_s: float) -> tuple[str, ...]:
        return ()


class NullEvents:
    """An event sink that keeps counts and the wall time of chosen events (for the harness)."""

    def __init__(self, wall: Callable[[], float] = time.perf_counter, watch: tuple[str, ...] = ("group_failed",)):
        self.wall = wall
        self.watch = watch
        self.count = 0
        self.first: dict[str, float] = {}
        self.names: list[str] = []

    def emit(self, event: Any, **fields: Any) -> dict[str, Any]:
        rec = {"event": str(getattr(event, "value", event)), **fields}
        self.record(rec)
        return rec

    def record(self, record: dict[str, Any]) -> None:
        self.count += 1
        name = record["event"]
        if name != "worker_started":
            self.names.append(name)
        if name in self.watch:
            self.first.setdefault(name, self.wall())
