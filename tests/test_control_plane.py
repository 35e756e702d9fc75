"""The control plane at scale: the real controller and policies with 1,000 simulated workers
(elastic.testing.simulated: injected clock, no Ray, no torch) through a failure, a node loss
(shrink) and a node join (grow)."""

from __future__ import annotations

import time

import pytest

from elastic.config import FailureConfig, RunConfig, ScalingConfig
from elastic._internal.supervisor.controller import Controller
from elastic._internal.supervisor.states import Finished
from elastic.testing.simulated import ManualClock as Clock, NullEvents, SimulatedGroup
from storage_fixtures import moto_s3  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(60)




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
    assert [r.world_size for r in ctl.recoveries] == [n, n - per_node, n]
    assert wall < 1.0, f"{wall:.2f}s: the controller's own work grew too costly at {n} workers"


@pytest.mark.timeout(300)  # 50 stand-ins take ~60 s to start on 2 cores
@pytest.mark.parametrize("n", [pytest.param(4), pytest.param(50, marks=pytest.mark.slow)])
def test_stand_ins_on_real_ray_a_killed_one_is_detected_within_the_bound(n):
    """Real Ray, the real RayWorkerGroup and controller, N stand-in workers (no torch, no CPU
    reserved): a SIGKILLed one is seen within a second (Ray fails its outstanding watch), far
    inside the frozen-worker bound (liveness_interval_s + poll_timeout_s). Starting each stand-in's
    process costs ~1.5 s of CPU here: 4 in the default run, 50 under -m slow."""
    import ray

    from elastic.testing.standin import measure

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = measure(n, window_s=2.0, liveness_s=1.0, poll_timeout_s=5.0)
    finally:
        ray.shutdown()
    print(out)
    assert out["detect_s"] < 1.0, out
    assert out["cycle_ms_median"] < 20, out  # the supervisor's own work per look at 50 workers


def test_event_log_flush_cost_on_s3_does_not_grow_with_the_run(moto_s3):  # noqa: F811
    """On an object store the log is rolling segments: a flush near event 10,000 costs what one
    near event 100 does (a whole-log rewrite would cost ~100x more). Same segment positions are
    compared (flushes every 100 events, segments of 1,000), medians of each window."""
    import statistics

    from elastic._internal.events import Event, EventLog

    log = EventLog("s3://elastic-test/flush-cost", flush_interval_s=1e9)
    times: dict[int, float] = {}
    for i in range(1, 10_001):
        log.emit(Event.CHECKPOINT_COMMITTED, step=i, seconds=0.01, bytes=123456, world_size=1000)
        if i % 100 == 0:
            t0 = time.perf_counter()
            log.flush()
            times[i] = time.perf_counter() - t0
    assert log.write_errors == 0
    early = statistics.median(times[i] for i in range(100, 1001, 100))
    late = statistics.median(times[i] for i in range(9100, 10_001, 100))
    print(f"flush: {early * 1e3:.1f} ms over events 100-1,000, {late * 1e3:.1f} ms over 9,100-10,000")
    assert late < 2.5 * early, (early, late)
    assert len(log.recent) <= 10_000 and log.count == 10_000
