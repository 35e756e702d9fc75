"""Conformance: every implementation of the WorkerGroup protocol keeps the contract the controller
relies on (elastic._internal.supervisor.worker_group.WorkerGroup), as fsspec runs every backend through one
suite (fsspec/tests/abstract).

The implementations: the real RayWorkerGroup, over stand-in workers (elastic.testing.standin) on a
local Ray; SimulatedGroup (elastic.testing.simulated, the control plane's scale harness); and the
controller tests' FakeGroup, StoppableGroup and StandbyGroup (tests/doubles.py). Each case drives a
group as the controller does and waits for what it expects with a deadline: the in-memory groups
answer at once, Ray's actors take a second or two to start.
"""

from __future__ import annotations

import ast
import inspect
import os
import signal
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from doubles import FakeGroup, StandbyGroup, StoppableGroup
from elastic.config import FailureConfig, RunConfig, ScalingConfig
from elastic._internal.protocol import Assignment, ParkReason, PollFailure, WorkerInfo, WorkerPoll, WorkerState
from elastic._internal.supervisor.worker_group import RayWorkerGroup, WorkerGroup
from elastic.testing.simulated import SimulatedGroup
from elastic._internal.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
CAPACITY = 2
"""Workers each group has room for (on Ray: 4 CPUs, 2 per worker)."""
POLL_TIMEOUT_S = 2.0
IMPLEMENTATIONS = (RayWorkerGroup, SimulatedGroup, FakeGroup, StoppableGroup, StandbyGroup)


@dataclass
class Impl:
    make: Callable[[], Any]
    """A group with room for CAPACITY workers."""
    crash: Callable[[Any, int], None]
    """The worker dies on its own (not through the group's kill)."""
    keeps_standbys: bool


def _ray_group() -> RayWorkerGroup:
    from elastic.testing.standin import RemoteStandIn

    run = RunConfig(scaling=ScalingConfig(min_workers=1, max_workers=CAPACITY, cpus_per_worker=2.0),
                    failure=FailureConfig(liveness_interval_s=1.0, poll_timeout_s=POLL_TIMEOUT_S))
    return RayWorkerGroup(lambda _c: None, run, worker_cls=RemoteStandIn)


def _sigkill(group: Any, wid: int) -> None:
    os.kill(group.infos[wid].pid, signal.SIGKILL)


def _dies(group: Any, wid: int) -> None:
    group.dead.add(wid)


KINDS = {
    "ray": lambda: Impl(_ray_group, _sigkill, keeps_standbys=True),
    "simulated": lambda: Impl(lambda: SimulatedGroup(CAPACITY), _dies, keeps_standbys=False),
    "fake": lambda: Impl(lambda: FakeGroup(CAPACITY, steps=10**6), _dies, keeps_standbys=False),
    "stoppable": lambda: Impl(lambda: StoppableGroup(CAPACITY, steps=10**6), _dies, keeps_standbys=False),
    "standby": lambda: Impl(lambda: StandbyGroup(CAPACITY, steps=10**6), _dies, keeps_standbys=True),
}


@pytest.fixture(params=list(KINDS))
def impl(request):
    if request.param == "ray":
        request.getfixturevalue("ray_local")  # one local Ray for the module (tests/conftest.py)
    return KINDS[request.param]()


@pytest.fixture
def group(impl):
    g = impl.make()
    yield g
    g.shutdown()


# -- helpers -----------------------------------------------------------------------------------
def eventually(check: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    """check() until it returns something true; at once for the in-memory groups."""
    out = wait_until(check, timeout_s=timeout_s)
    if not out:
        raise AssertionError(f"not within {timeout_s:g}s: {what}")
    return out


def cpus_free(n: float) -> Callable[[], bool]:
    """Whether Ray counts `n` CPUs free (a RayWorkerGroup's workers hold 2 each of 4)."""
    import ray

    return lambda: ray.available_resources().get("CPU", 0.0) == n


def placed(g: Any, n: int) -> list[int]:
    """Ask for n workers and wait until they are ready (refresh, as the controller does)."""
    ids = g.request(n)
    assert len(ids) == len(set(ids)) == n

    def all_ready() -> bool:
        g.refresh()
        return set(ids) <= set(g.ready())

    eventually(all_ready, f"{n} workers ready")
    return ids


def assign(wids: list[int], generation: int) -> dict[int, Assignment]:
    """The assignments of one generation, ranks in the order given."""
    return {w: Assignment(generation=generation, rank=r, world_size=len(wids), store_host="127.0.0.1", store_port=1,
                          backend="gloo", collective_timeout_s=5.0) for r, w in enumerate(wids)}


class Poller:
    """Polls as the controller does: every answer covers exactly the ids asked; the events each
    worker sent are kept."""

    def __init__(self, g: Any) -> None:
        self.g = g
        self.events: dict[int, list[dict[str, Any]]] = defaultdict(list)

    def __call__(self, wids: list[int]) -> dict[int, WorkerPoll | PollFailure]:
        out = self.g.poll(list(wids), POLL_TIMEOUT_S)
        assert set(out) == set(wids), out
        for w, p in out.items():
            assert isinstance(p, (WorkerPoll, PollFailure)), p
            if isinstance(p, WorkerPoll):
                self.events[w].extend(p.events)
        return out

    def until(self, wids: list[int], ok: Callable[[int, WorkerPoll | PollFailure], bool], what: str) -> dict:
        def check() -> dict | None:
            out = self(wids)
            return out if all(ok(w, p) for w, p in out.items()) else None

        return eventually(check, what)


def running(generation: int) -> Callable[[int, Any], bool]:
    return lambda _w, p: isinstance(p, WorkerPoll) and p.state is WorkerState.RUNNING and p.generation == generation


def left_at_a_boundary(_w: int, p: Any) -> bool:
    return isinstance(p, WorkerPoll) and p.state is WorkerState.PARKED and p.park_reason is ParkReason.PAUSE


def _members(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(cls).items()
            if callable(fn) and not name.startswith("_")}


# -- the protocol itself ---------------------------------------------------------------------------
def test_the_protocol_declares_every_call_the_controller_makes():
    tree = ast.parse((ROOT / "elastic/_internal/supervisor/controller.py").read_text())
    called = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
              and isinstance(node.value, ast.Attribute) and node.value.attr == "group"
              and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    declared = set(_members(WorkerGroup)) | set(WorkerGroup.__annotations__)
    assert called and called <= declared, f"the controller calls, undeclared: {sorted(called - declared)}"


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_each_implementation_has_every_method_with_the_protocols_parameters(cls):
    for name, sig in _members(WorkerGroup).items():
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        params = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
        theirs = [(p.name, p.kind, p.default) for p in inspect.signature(getattr(cls, name)).parameters.values()]
        assert theirs == params, f"{cls.__name__}.{name}{inspect.signature(getattr(cls, name))} is not {name}{sig}"


# -- the contract -------------------------------------------------------------------------------
def test_requests_wait_for_room_and_ids_are_never_reused(group):
    g = group
    eventually(lambda: g.placeable() == CAPACITY, f"room for {CAPACITY} workers")
    ids = g.request(CAPACITY + 1)
    assert len(set(ids)) == CAPACITY + 1 and set(g.pending()) == set(ids) and g.ready() == []

    def full() -> bool:
        g.refresh()
        return len(g.ready()) == CAPACITY

    eventually(full, f"{CAPACITY} of {CAPACITY + 1} workers placed")
    ready = g.ready()
    assert ready == sorted(ready) and set(ready) < set(ids)
    queued = sorted(set(ids) - set(ready))
    assert g.pending() == queued and g.placeable() == 0  # the one without room waits, queued
    for w in ready:
        info = g.infos[w]
        assert isinstance(info, WorkerInfo) and info.pid > 0 and info.node_id

    victim = ready[0]
    g.kill(victim)
    assert victim not in g.ready() and victim not in g.pending() and victim not in g.infos
    assert Poller(g)([victim]) == {victim: PollFailure.DEAD}

    def placed_in_its_room() -> bool:
        g.refresh()
        return g.ready() == sorted([ready[1], *queued]) and g.pending() == []

    eventually(placed_in_its_room, "the queued worker placed in the room a kill freed")
    assert not set(g.request(1)) & set(ids)


def test_a_started_group_runs_and_each_event_arrives_once(group):
    g = group
    ids = placed(g, CAPACITY)
    poll = Poller(g)
    assert g.start(assign(ids, 0), POLL_TIMEOUT_S) == []
    first = poll.until(ids, running(0), "every worker running generation 0")

    def stepped(w: int, p: Any) -> bool:
        return running(0)(w, p) and p.step > first[w].step

    poll.until(ids, stepped, "every worker past its first step")
    rank0 = ids[0]

    def restored(w: int) -> list[dict[str, Any]]:
        return [e for e in poll.events[w] if e["event"] == "restored" and e.get("generation") == 0]

    eventually(lambda: poll(ids) and restored(rank0), "rank 0 says where generation 0 restored from")
    for _ in range(5):
        last = poll(ids)
    assert len(restored(rank0)) == 1 and all(len(restored(w)) <= 1 for w in ids), dict(poll.events)
    # The same fact as a typed field, in every answer of this generation (what the controller reads).
    assert last[rank0].restored is not None and last[rank0].restored.generation == 0, last[rank0]


def test_running_workers_leave_at_a_step_boundary_when_asked_and_take_a_new_generation(group):
    """A pause (a resize), a stop (SIGINT/SIGTERM to the driver) and a preemption notice each end a
    worker's generation at a step boundary; a parked worker takes the next generation."""
    g = group
    ids = placed(g, CAPACITY)
    poll = Poller(g)
    assert g.start(assign(ids, 0), POLL_TIMEOUT_S) == []
    poll.until(ids, running(0), "generation 0 running")
    g.request_pause(ids)
    poll.until(ids, left_at_a_boundary, "every worker parked at a step boundary after a pause")

    assert g.start(assign(ids[::-1], 1), POLL_TIMEOUT_S) == []  # the survivors, ranks swapped
    poll.until(ids, running(1), "the parked workers running generation 1")
    g.request_stop(ids)
    poll.until(ids, lambda _w, p: isinstance(p, WorkerPoll) and p.state is not WorkerState.RUNNING,
               "every worker out of generation 1 after a stop")

    assert g.start(assign(ids, 2), POLL_TIMEOUT_S) == []
    poll.until(ids, running(2), "generation 2 running")
    leaving = ids[-1]
    g.request_preempt([leaving])
    poll.until([leaving], left_at_a_boundary, "the preempted worker parked at a step boundary")


def test_a_worker_that_dies_is_reported_dead_refused_and_forgotten_when_killed(group, impl):
    g = group
    ids = placed(g, CAPACITY)
    poll = Poller(g)
    assert g.start(assign(ids, 0), POLL_TIMEOUT_S) == []
    poll.until(ids, running(0), "generation 0 running")
    survivor, victim = ids
    impl.crash(g, victim)
    poll.until([victim], lambda _w, p: p is PollFailure.DEAD, "the dead worker reported DEAD")
    assert isinstance(poll([survivor])[survivor], WorkerPoll)  # the others still answer
    assert g.start(assign([survivor, victim], 1), POLL_TIMEOUT_S) == [victim]  # it cannot take a generation
    g.kill(victim)
    g.kill(victim)  # twice is harmless
    assert victim not in g.ready() and victim not in g.infos
    assert poll([victim]) == {victim: PollFailure.DEAD}


def test_standbys_wait_on_their_nodes_and_a_promoted_one_becomes_a_worker(group, impl):
    g = group
    ids = placed(g, CAPACITY)
    nodes = {g.infos[w].node_id for w in ids}
    assert g.start(assign(ids, 0), POLL_TIMEOUT_S) == []
    g.ensure_standbys(nodes, per_node=0)  # the policy wants none
    g.refresh()
    assert g.standbys() == {}
    assert all(g.gpu_ids(w, POLL_TIMEOUT_S) == () for w in ids)  # no reservation of another actor's
    if not impl.keeps_standbys:
        g.ensure_standbys(nodes, per_node=1)
        g.refresh()
        assert g.standbys() == {} and g.standbys_starting() == {} and g.standby_startup_s() is None
        return

    g.ensure_standbys(nodes, per_node=1)
    if isinstance(g, RayWorkerGroup):  # asked for, not collected yet (a start-up takes seconds)
        assert g.standbys_starting() == {n: 1 for n in nodes} and g.standbys() == {}

    def one_per_node() -> dict[str, int] | None:
        g.refresh()
        return g.standbys() if set(g.standbys()) == nodes else None

    standbys = eventually(one_per_node, "a ready standby on every node")
    assert g.standbys_starting() == {}
    for node, s in standbys.items():
        assert s not in g.ready() and s not in g.pending() and s not in ids and g.infos[s].node_id == node
    g.ensure_standbys(nodes, per_node=1)
    g.refresh()
    assert g.standbys() == standbys  # kept, not added to
    # A live node whose standby answers is not lost; its standby is kept.
    assert g.lost_nodes(nodes) == set() and g.standbys() == standbys
    if isinstance(g, RayWorkerGroup):  # a node Ray's node table does not list is lost
        assert g.lost_nodes({"0" * 56}) == {"0" * 56}
        # The supervisor's own node is never lost for a silent standby: with no time to answer at
        # all, the probe would call every node silent (all here share the test's one Ray node).
        import elastic._internal.supervisor.worker_group as wg
        old_probe, wg.NODE_PROBE_S = wg.NODE_PROBE_S, 0.0
        try:
            assert g._silent_nodes(nodes) == set()
        finally:
            wg.NODE_PROBE_S = old_probe
    startup = g.standby_startup_s()
    assert startup is None or startup >= 0

    survivor, victim = ids
    node = g.infos[victim].node_id
    g.kill(victim)  # its node has a worker's resources free again
    if isinstance(g, RayWorkerGroup):
        eventually(cpus_free(2.0), "the dead worker's 2 CPUs free")
    promoted = standbys[node]
    g.promote(promoted)
    assert promoted not in g.standbys().values() and promoted in g.ready()
    assert g.gpu_ids(promoted, 30.0) == ()  # its reservation placed (no GPU on this cluster)
    assert g.start(assign([survivor, promoted], 1), POLL_TIMEOUT_S) == []
    Poller(g).until([survivor, promoted], running(1), "the promoted standby running generation 1")
    if isinstance(g, RayWorkerGroup):
        # The promoted standby holds the dead worker's CPUs on its node (a placement group: no Ray
        # worker process of its own), and gives them back when it goes.
        eventually(cpus_free(0.0), "the reservation holding the dead worker's 2 CPUs")
        g.kill(promoted)
        eventually(cpus_free(2.0), "the reservation released with its worker")


def test_what_the_group_says_about_the_cluster(group):
    assert isinstance(group.placeable(), int) and group.placeable() >= 0
    assert isinstance(group.describe_resources(), str) and group.describe_resources()
    assert group.draining_nodes() == set()  # nothing is being drained here
