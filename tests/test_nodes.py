"""Node loss and node join on a multi-node Ray cluster (ray.cluster_utils.Cluster), and the death
of the supervisor."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import elastic
from conftest import final_model
from elastic._internal.events import read_events
from elastic._internal.waiting import wait_until
import jobs

pytestmark = pytest.mark.timeout(240)


def wait_for(predicate, timeout_s: float, what: str):
    value = wait_until(predicate, timeout_s=timeout_s, interval_s=0.1)
    if not value:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
    return value


def built(uri: str) -> list[dict]:
    return [e for e in read_events(uri) if e["event"] == "group_built"]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _trainer(uri: str, steps: int, min_w: int, max_w: int, step_sleep: float = 0.0,
             strategy: str = "ddp") -> elastic.ElasticTrainer:
    return elastic.ElasticTrainer(
        # No dropout: random masks are drawn per rank, so they change with the world size.
        jobs.train, train_loop_config={"steps": steps, "step_sleep": step_sleep, "dropout": 0.0, "strategy": strategy},
        scaling=elastic.ScalingConfig(min_workers=min_w, max_workers=max_w, placement_timeout_s=30, grow_interval_s=0.5),
        checkpoint=elastic.CheckpointConfig(uri=uri, every_n_steps=10),
        failure=elastic.FailureConfig(max_failures=5, collective_timeout_s=8, poll_timeout_s=2))


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_node_removed_then_added_world_shrinks_and_grows(cluster, tmp_path, strategy):
    """fsdp: the lost node's rank had its buddy on the head node, so its rows come back from that
    copy (no storage read), resharded 3 -> 2, and again 2 -> 3 when the node returns."""
    import ray

    extra = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    wait_for(lambda: ray.cluster_resources().get("CPU", 0) >= 3, 30, "the new node's CPU")
    ref_uri = str(tmp_path / "ref")
    assert _trainer(ref_uri, 120, 3, 3, strategy=strategy).fit(quiet=True).ok
    uri = str(tmp_path / "run")
    actions: list[str] = []
    result: dict = {}
    # Ray's Cluster must be driven from the main thread, so the run goes to a background thread.
    t = threading.Thread(target=lambda: result.setdefault(
        "r", _trainer(uri, 120, 2, 3, step_sleep=0.12, strategy=strategy).fit(raise_on_failure=False, quiet=True)),
        daemon=True)
    # 0.12 s steps: after the loss the run has ~10 s left for the joined node's worker to start
    # (a cold actor importing torch: 2-5 s on a loaded 2-core machine) and join at a boundary.
    t.start()
    wait_for(lambda: any(e["world_size"] == 3 for e in built(uri)), 60, "world size 3")
    wait_for(lambda: any(e["event"] == "checkpoint_committed" for e in read_events(uri)), 60, "a checkpoint")
    cluster.remove_node(extra)
    actions.append("removed")
    wait_for(lambda: built(uri)[-1]["world_size"] == 2, 60, "world size 2 after node loss")
    joined = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    actions.append("added")
    t.join(timeout=120)
    r = result["r"]
    assert r.ok, r.error
    assert actions == ["removed", "added"]
    sizes = [e["world_size"] for e in r.events if e["event"] == "group_built"]
    assert sizes[0] == 3 and 2 in sizes and sizes[-1] == 3, sizes
    assert any(e["event"] == "resized" for e in r.events)  # growth is a resize, not a failure
    if strategy == "fsdp":  # every state after the first came from memory: own rows and buddy copies
        later = {e["source"] for e in r.events if e["event"] == "restored" and e["generation"] > 0}
        assert later and later <= {"memory", "buddy"}, later
    cluster.remove_node(joined)  # leave the cluster as the module found it
    ref, got = final_model(ref_uri), final_model(uri)
    for k in ref:
        rel = (ref[k] - got[k]).abs().max() / ref[k].abs().max()
        assert rel <= 1e-4, f"{k}: relative difference {rel:.3g}"


@pytest.mark.slow  # chaos_tests' driver kill takes the supervisor down with it, and resumes
def test_supervisor_death_stops_workers_and_run_resumes(cluster, tmp_path):
    uri = str(tmp_path / "sup")
    trainer = _trainer(uri, 400, 2, 2, step_sleep=0.02)
    result: dict = {}

    def run() -> None:
        try:
            result["r"] = trainer.fit(raise_on_failure=False, quiet=True)
        except Exception as exc:  # noqa: BLE001 - the driver sees the supervisor die
            result["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for(lambda: any(e["event"] == "checkpoint_committed" for e in read_events(uri)), 60, "a checkpoint")
    pids = [m["pid"] for m in built(uri)[-1]["members"]]
    sup_pid = [e["supervisor_pid"] for e in read_events(uri) if e["event"] == "run_started"][0]
    os.kill(sup_pid, signal.SIGKILL)
    t0 = time.monotonic()

    def workers_gone() -> bool:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        return not alive

    wait_for(workers_gone, 30, "workers to stop after their supervisor died")
    stopped_in = time.monotonic() - t0
    t.join(timeout=30)
    assert "exc" in result or not result["r"].ok
    assert stopped_in < 30
    # Everything died: the newest committed checkpoint is where the run continues.
    latest = elastic._internal.checkpoint.CheckpointStore(uri).latest()
    assert latest is not None
    r = _trainer(uri, latest.step + 10, 2, 2).fit(quiet=True)
    restored = [e for e in r.events if e["event"] == "restored"]
    assert r.ok and restored[0]["source"] == f"checkpoint:{latest.step}"


@pytest.mark.slow  # test_recovery's SIGTERM takes the same commit-and-leave path; test_compat reads drains
def test_ray_node_drain_is_a_preemption_not_a_failure(cluster, tmp_path):
    import ray
    from ray.core.generated import autoscaler_pb2

    extra = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    wait_for(lambda: ray.cluster_resources().get("CPU", 0) >= 3, 30, "the new node's CPU")
    uri = str(tmp_path / "drain")
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "r", _trainer(uri, 150, 2, 3, step_sleep=0.03).fit(raise_on_failure=False, quiet=True)), daemon=True)
    # 0.12 s steps: after the loss the run has ~10 s left for the joined node's worker to start
    # (a cold actor importing torch: 2-5 s on a loaded 2-core machine) and join at a boundary.
    t.start()
    wait_for(lambda: any(e["world_size"] == 3 for e in built(uri)), 60, "world size 3")
    gcs = ray._private.worker.global_worker.gcs_client
    accepted, why = gcs.drain_node(extra.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "spot preemption (test)", int(time.time() * 1000) + 60_000)
    assert accepted, why
    t.join(timeout=120)
    r = result["r"]
    assert r.ok, r.error
    assert r.failures == 0
    names = [e["event"] for e in r.events]
    assert "node_draining" in names and "worker_left" in names and "worker_failed" not in names
    built_events = [e for e in r.events if e["event"] == "group_built"]
    assert built_events[0]["world_size"] == 3 and built_events[-1]["world_size"] == 2
    assert all(m["node_id"] != extra.node_id for m in built_events[-1]["members"])
    paused_at = [e["step"] for e in r.events if e["event"] == "restored" and e["generation"] == 1]
    commits = [e["step"] for e in r.events if e["event"] == "checkpoint_committed"]
    assert paused_at[0] in commits  # committed before the node went
    cluster.remove_node(extra)
