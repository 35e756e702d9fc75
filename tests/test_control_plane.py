"""The control plane at scale: the real controller and policies with 1,000 simulated workers
(elastic.supervisor.simulated: injected clock, no Ray, no torch) through a failure, a node loss
(shrink) and a node join (grow)."""

from __future__ import annotations

import time

import pytest

from elastic.config import FailureConfig, RunConfig, ScalingConfig
from elastic.supervisor.controller import Controller
from elastic.supervisor.simulated import NullEvents, SimulatedGroup
from elastic.supervisor.states import Finished

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt


def test_a_thousand_workers_through_a_failure_a_shrink_and_a_grow():
    n, per_node = 1000, 8
    group = SimulatedGroup(n, per_node=per_node, steps=120)
    clock = Clock()
    events = NullEvents(watch=("group_failed", "group_built"))
    run = RunConfig(scaling=ScalingConfig(min_workers=n - 4 * per_node, max_workers=n, grow_interval_s=5),
                    failure=FailureConfig(max_failures=5, poll_timeout_s=2, collective_timeout_s=5))
    ctl = Controller(run, group, events, ("127.0.0.1", 1), clock=clock, sleep=clock.sleep)
    group.die_at[17] = 20                                   # one rank dies: replaced, same size
    group.at_step[50] = lambda: group.remove_node(3)        # a node is lost: 8 ranks, no room left
    group.at_step[80] = lambda: group.add_nodes(1)          # a node joins: back to 1,000
    t0 = time.perf_counter()
    state = ctl.run_to_end()
    wall = time.perf_counter() - t0
    print(f"{n} simulated workers: {wall:.3f}s of wall time, {group.starts} generations, "
          f"{group.assigned} assignments, {events.count} events")
    assert isinstance(state, Finished), state
    built = [e for e in events.names if e == "group_built"]
    assert len(built) == 4 and events.names.count("group_failed") == 2, events.names
    sizes = [ctl.progress.world_size]
    assert sizes == [n] and ctl.failures == 2 and len(ctl.recoveries) == 3
    assert [r["world_size"] for r in ctl.recoveries] == [n, n - per_node, n]
    assert wall < 1.0, f"{wall:.2f}s: the controller's own work grew too costly at {n} workers"
