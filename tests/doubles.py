"""Worker groups for the controller's unit tests: in memory, scripted, no Ray (tests only).

FakeGroup's workers advance one step per poll; a test scripts deaths (`die_at`, `dead`), freezes
(`frozen`), preemption notices, draining nodes and the cluster's capacity. StoppableGroup commits and
parks when asked to stop; StandbyGroup keeps a standby on every node that hosts workers. Each
implements the WorkerGroup protocol (elastic._internal.supervisor.worker_group), as the real RayWorkerGroup
and elastic.testing.simulated.SimulatedGroup do.
"""

from __future__ import annotations

from elastic._internal.protocol import Restored, WorkerInfo, WorkerPoll
from elastic._internal.supervisor import policy

class FakeGroup:
    """Workers that advance one step per poll; tests script deaths, freezes and capacity."""

    def __init__(self, capacity: int, steps: int = 20):
        self.capacity = capacity
        self.steps = steps
        self.infos: dict[int, WorkerInfo] = {}
        self._pending: list[int] = []
        self._next = 0
        self.gen: dict[int, int] = {}
        self.step: dict[int, int] = {}
        self.state: dict[int, str] = {}
        self.global_step = 0
        self.dead: set[int] = set()
        self.frozen: set[int] = set()
        self.preempted: set[int] = set()
        self.killed: list[int] = []
        self.die_at: dict[int, int] = {}  # wid -> step at which it dies
        self.starts: list[tuple[int, int, int]] = []  # (wid, generation, rank)
        self.draining: set[str] = set()
        self.gone_nodes: set[str] = set()  # nodes the cluster reports dead (a whole node lost)
        self.node_checks: list[set[str]] = []  # the nodes asked about (lost_nodes), in order
        self.reason: dict[int, str] = {}  # why a parked worker parked: pause | broken
        self.sticky: set[int] = set()
        self.events: dict[int, list[dict]] = {}
        self.restored: dict[int, Restored] = {}  # what each worker restored in its latest generation
        self.committed: dict[int, int] = {}  # the newest step each worker saw committed
        self.requests: list[tuple[int, bool]] = []  # (n, background)

    def request(self, n: int, *, background: bool = False) -> list[int]:
        self.requests.append((n, background))
        ids = list(range(self._next, self._next + n))
        self._next += n
        self._pending += ids
        return ids

    def refresh(self) -> list[int]:
        newly = []
        while self._pending and len(self.infos) < self.capacity:
            wid = self._pending.pop(0)
            self.infos[wid] = WorkerInfo(pid=10_000 + wid, node_id=f"node{wid}", ip="127.0.0.1")
            newly.append(wid)
        return newly

    def pending(self) -> list[int]:
        return list(self._pending)

    def ready(self) -> list[int]:
        return sorted(self.infos)

    def start(self, assignments: dict, timeout_s: float) -> list[int]:
        for wid, a in assignments.items():
            self.starts.append((wid, a.generation, a.rank))
            self.gen[wid] = a.generation
            self.state[wid] = "running"
            self.reason.pop(wid, None)
            self.step[wid] = self.global_step
            self.events[wid] = [{"event": "restored", "step": self.global_step, "generation": a.generation,
                                 "source": "memory", "time": 0.0}]
            self.restored[wid] = Restored(generation=a.generation, step=self.global_step)
        return [w for w in assignments if w in self.dead]  # a worker that is gone cannot take it

    def poll(self, wids: list[int], timeout_s: float) -> dict[int, WorkerPoll | str]:
        out: dict[int, WorkerPoll | str] = {}
        running = [w for w in wids if self.state.get(w) == "running" and w not in self.dead | self.frozen]
        for w in running:
            if self.die_at.get(w) == self.step[w]:
                self.dead.add(w)
        if any(w in self.dead for w in wids):  # a dead peer breaks the group for everyone
            for w in running:
                if w not in self.dead:
                    self.state[w] = "parked"
                    self.reason[w] = "broken"
        for w in wids:
            if w in self.dead or w not in self.infos:
                out[w] = policy.DEAD
                continue
            if w in self.frozen:
                out[w] = policy.UNRESPONSIVE
                continue
            if w in self.sticky:  # still on its way out: answers, but has not parked yet
                out[w] = WorkerPoll(state="running", generation=self.gen[w], step=self.step[w], progress_age_s=0.0,
                                    waiting_in_collective_s=None, preempted=w in self.preempted)
                continue
            if self.state[w] == "running":
                self.step[w] += 1
                self.global_step = max(self.global_step, self.step[w])
                if w in self.preempted:
                    for p in wids:
                        if self.state.get(p) == "running":
                            self.state[p] = "parked"
                            self.reason[p] = "pause"
                elif self.step[w] >= self.steps:
                    self.state[w] = "finished"
            events = self.events.pop(w, [])
            out[w] = WorkerPoll(state=self.state[w], generation=self.gen[w], step=self.step[w], progress_age_s=0.0,
                                waiting_in_collective_s=None, metrics={"loss": 1.0}, events=events,
                                preempted=w in self.preempted, park_reason=self.reason.get(w),
                                committed_step=self.committed.get(w, -1), restored=self.restored.get(w))
        return out

    def request_pause(self, wids: list[int]) -> None:
        for w in wids:
            if self.state.get(w) == "running":
                self.state[w] = "parked"
                self.reason[w] = "pause"

    def request_preempt(self, wids: list[int]) -> None:
        self.preempted.update(wids)

    def request_stop(self, wids: list[int]) -> None:
        self.request_pause(wids)  # parked at the step boundary (StoppableGroup also commits there)

    def draining_nodes(self) -> set[str]:
        return set(self.draining)

    def lost_nodes(self, node_ids: set[str]) -> set[str]:
        self.node_checks.append(set(node_ids))
        return set(node_ids) & self.gone_nodes

    def kill(self, wid: int) -> None:
        self.killed.append(wid)
        self.infos.pop(wid, None)
        self.dead.add(wid)
        if wid in self._pending:
            self._pending.remove(wid)

    def placeable(self) -> int:
        return max(0, self.capacity - len(self.infos) - len(self._pending))

    def describe_resources(self) -> str:
        return f"CPU: {self.capacity} slots"

    def shutdown(self) -> None:
        pass

    def ensure_standbys(self, node_ids: set[str], *, per_node: int | None = None) -> None:
        pass  # this fake keeps none: a lost worker is replaced by a newcomer

    def standby_startup_s(self) -> float | None:
        return None

    def standbys(self) -> dict[str, int]:
        return {}

    def standbys_starting(self) -> dict[str, int]:
        return {}

    def promote(self, wid: int) -> None:
        raise AssertionError("no standby to promote")

    def gpu_ids(self, wid: int, timeout_s: float) -> tuple[str, ...]:
        return ()


class StoppableGroup(FakeGroup):
    """Workers that, asked to stop, commit at the next step and park (as a preemption does)."""

    def request_stop(self, wids: list[int]) -> None:
        for w in wids:
            if self.state.get(w) == "running":
                self.step[w] += 1
                self.state[w], self.reason[w] = "parked", "pause"
        top = max(self.step[w] for w in wids)
        self.events[wids[0]] = [{"event": "checkpoint_committed", "step": top, "time": 0.0}]
        self.committed[wids[0]] = top

    def heartbeat(self) -> None:
        pass


class StandbyGroup(FakeGroup):
    """A standby (reserving nothing) waits on every node that hosts workers."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.standby_of: dict[str, int] = {}
        self.promoted: list[int] = []

    def ensure_standbys(self, node_ids: set[str], *, per_node: int | None = None) -> None:
        if per_node == 0:  # the policy wants none (standby_per_node=0)
            return
        for node in sorted(node_ids - set(self.standby_of)):
            wid = self._next
            self._next += 1
            self.infos[wid] = WorkerInfo(pid=20_000 + wid, node_id=node, ip="127.0.0.1")
            self.standby_of[node] = wid

    def standbys(self) -> dict[str, int]:
        return dict(self.standby_of)

    def lost_nodes(self, node_ids: set[str]) -> set[str]:
        lost = super().lost_nodes(node_ids)
        for node in lost & set(self.standby_of):
            self.kill(self.standby_of.pop(node))  # a standby dies with its node
        return lost

    def promote(self, wid: int) -> None:
        self.standby_of = {n: w for n, w in self.standby_of.items() if w != wid}
        self.promoted.append(wid)

    def ready(self) -> list[int]:
        return sorted(w for w in self.infos if w not in self.standby_of.values())
