"""Sharded models (FSDP2 on gloo) through the whole runtime on real Ray: a lost rank's rows come back
from its buddy's copy (no storage read), a rank lost with its buddy falls back to the checkpoint,
and a run resumed at another world size reshards."""

from __future__ import annotations

import pytest

import elastic
from chaos_tests.harness import model_diff
from conftest import References, assert_models_equal, final_model
from elastic.chaos.faults import fired
import jobs

pytestmark = pytest.mark.timeout(240)
STEPS = 30


def _fit(uri, workers, faults=(), marker_dir="/tmp", steps=STEPS, every=10, overlap=False, shm=True, **config):
    return elastic.ElasticTrainer(
        jobs.train, train_loop_config={"steps": steps, "strategy": "fsdp", "dropout": 0.0, "faults": list(faults),
                                       "marker_dir": str(marker_dir), **config},
        scaling=elastic.ScalingConfig(min_workers=workers, placement_timeout_s=30),
        checkpoint=elastic.CheckpointConfig(uri=str(uri), every_n_steps=every),
        failure=elastic.FailureConfig(max_failures=3, collective_timeout_s=10, poll_timeout_s=2, buddy_overlap=overlap,
                                      buddy_shm=shm),
    ).fit(raise_on_failure=False, quiet=True)


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    return References(tmp_path_factory, _fit, "fsdp-ref")


# Killed inside the (shared-memory) exchange: -m slow here (test_buddy_inline kills a rank there in
# threads, the 4-rank test below in real processes); the default run keeps the loopback one.
@pytest.mark.parametrize("inside,overlap", [(None, False), pytest.param("buddy_exchange", False, marks=pytest.mark.slow),
                                            ("buddy_exchange", True)],
                         ids=["step-start", "in-buddy-exchange", "in-overlapped-exchange-over-loopback"])
def test_a_killed_rank_comes_back_from_its_buddy_and_the_model_ends_equal(reference, tmp_path, inside, overlap):
    """The recovery builds its model inside skip_init_if_restoring (the reference run initialises it:
    generation 0 must init exactly as without it), and still ends equal. Killed inside the commit's
    buddy exchange (its receives posted, its first send launched), no step is held whole at the new
    step: the survivor rolls back to the step before (its snapshot and copy), and still ends equal;
    so does the background exchange (buddy_overlap), killed while the next step runs: a survivor
    whose exchange failed commits nothing on top of it (≤ 1 step lost, however late the send). The
    two ranks share a node: the survivor maps its dead buddy's rows from shared memory, except in
    the overlapped case, run with buddy_shm off (its copies go over loopback TCP)."""
    fault = {"kind": "sigkill", "step": 17, "rank": 1, **({"inside": inside} if inside else {})}
    r = _fit(tmp_path / "run", 2, faults=[fault], marker_dir=tmp_path, skip_init=True, overlap=overlap, shm=not overlap)
    assert r.ok, r.error
    assert fired(tmp_path) == ["fault-sigkill-step17-rank1" + (f"-in-{inside}" if inside else "")]
    assert r.failures == 1
    assert r.metrics["init_skipped"] == 1.0  # the recovery built its model without initialising it
    assert r.metrics["model_kept"] == 1.0  # the survivor (rank 0) trained on the model it had sharded
    built = [e for e in r.events if e["event"] == "group_built"]
    survivor = {m["rank"]: m["pid"] for m in built[0]["members"]}[0]
    assert survivor in [m["pid"] for m in built[1]["members"]]  # the survivor kept its process
    restored = [e for e in r.events if e["event"] == "restored" and e["generation"] == 1]
    assert restored and {e["source"] for e in restored} == {"buddy"}  # no storage read
    rec = [e for e in r.events if e["event"] == "recovered"]
    assert len(rec) == 1 and rec[0]["lost_steps"] <= 1
    # No rank gathered the whole state: host memory during the restore stayed within 3x its rows.
    assert 0 < r.metrics["restore_host_bytes"] <= 3 * r.metrics["shard_bytes"], r.metrics
    # rank 0 (the survivor) restored its dead buddy's rows from the slot it maps, not a received copy
    assert (r.metrics["restore_mapped_bytes"] > 0) == (not overlap), r.metrics
    assert_models_equal(reference[2], final_model(str(tmp_path / "run")))


# Over loopback: -m slow (~20 s); the default run keeps the shared-memory transport, the default one,
# and a kill over loopback in the overlapped-exchange case above.
@pytest.mark.parametrize("shm", [pytest.param(False, marks=pytest.mark.slow), True], ids=["loopback", "shared-memory"])
def test_a_rank_killed_in_the_first_step_after_a_recovery_comes_back_from_memory(reference, tmp_path, shm):
    """Rank 1 killed at step 17, then rank 0 (the survivor) at the top of the first step after the
    recovery: the newcomer must already hold rank 0's rows of step 17 (the restore's buddy exchange
    done before training resumes), so the second recovery comes from memory too, not from the
    step-10 checkpoint (7 steps lost). Over loopback the old background exchange lost this race;
    through shared memory the newcomer maps the slot the survivor kept for its snapshot, which must
    outlive the survivor's death."""
    from elastic.chaos.job import FIRST_STEP

    faults = [{"kind": "sigkill", "step": 17, "rank": 1}, {"kind": "sigkill", "step": FIRST_STEP, "rank": 0}]
    r = _fit(tmp_path / "run", 2, faults=faults, marker_dir=tmp_path, shm=shm)
    assert r.ok, r.error
    assert len(fired(tmp_path)) == 2 and r.failures == 2, r.events
    restored = [(e["generation"], e["source"]) for e in r.events if e["event"] == "restored" and e["generation"] > 0]
    assert sorted(set(restored)) == [(1, "buddy"), (2, "buddy")], restored
    assert max(e["lost_steps"] for e in r.events if e["event"] == "recovered") <= 1
    assert_models_equal(reference[2], final_model(str(tmp_path / "run")))


@pytest.mark.slow  # ~50 s: four runs at 2-3 ranks
def test_a_rank_lost_with_its_buddy_falls_back_to_the_checkpoint_and_a_resume_reshards(ray_local, tmp_path):
    """3 ranks, rank 0 and its buddy (rank 1) killed together: their rows exist only in the step-10
    checkpoint, which the new group reshards onto itself; then the run is resumed at 2 ranks."""
    r = _fit(tmp_path / "run", 3, faults=[{"kind": "sigkill", "step": 14, "rank": 0},
                                          {"kind": "sigkill", "step": 14, "rank": 1}], marker_dir=tmp_path)
    assert r.ok, r.error
    restored = {e["source"] for e in r.events if e["event"] == "restored" and e["generation"] == 1}
    assert restored == {"checkpoint:10"}, restored
    straight = tmp_path / "straight"
    s = _fit(straight, 3)
    assert s.ok, s.error
    assert_models_equal(final_model(str(straight)), final_model(str(tmp_path / "run")))  # same steps again
    # Resume the finished run for more steps at another world size: DCP reshards 3 -> 2.
    more = _fit(tmp_path / "run", 2, steps=STEPS + 10)
    assert more.ok, more.error
    assert [e["source"] for e in more.events if e["event"] == "restored"] == [f"checkpoint:{STEPS}"] * 2
    cont = _fit(straight, 3, steps=STEPS + 10)
    assert cont.ok and model_diff(final_model(str(tmp_path / "run")), final_model(str(straight))) <= 1e-4


@pytest.mark.slow  # ~40 s; the 2-rank kill above is the same path at the smallest world size
def test_four_ranks_a_killed_rank_comes_back_from_its_buddy_and_ends_equal(reference, tmp_path):
    r = _fit(tmp_path / "run", 4, faults=[{"kind": "sigkill", "step": 17, "rank": 2}], marker_dir=tmp_path)
    assert r.ok, r.error
    # Exactly one: no survivor is held in the old group (a buddy send to the dead rank that gloo
    # never fails is left behind: BuddyCopies.abandon).
    assert fired(tmp_path) == ["fault-sigkill-step17-rank2"] and r.failures == 1, r.events
    assert {e["source"] for e in r.events if e["event"] == "restored" and e["generation"] == 1} == {"buddy"}
    assert max(e["lost_steps"] for e in r.events if e["event"] == "recovered") <= 1
    assert_models_equal(reference[4], final_model(str(tmp_path / "run")))


@pytest.mark.slow  # ~25 s each
@pytest.mark.parametrize("inside", ["all_gather", "reduce_scatter", "buddy_exchange"])
def test_four_ranks_a_rank_killed_inside_a_collective_costs_one_failure(reference, tmp_path, inside):
    """Rank 2 launches its share of an FSDP2 all-gather (forward) / reduce-scatter (backward) / its
    commit's buddy exchange and dies: every survivor is out of it within a second, none is replaced,
    and the survivors train on, on the models they had sharded (kept_model.py: FSDP2's state reset
    from inside a forward or a backward), to the failure-free run's model."""
    from elastic.chaos.faults import fired_at

    r = _fit(tmp_path / "run", 4, faults=[{"kind": "sigkill", "step": 17, "rank": 2, "inside": inside}],
             marker_dir=tmp_path, note_exits=True)
    assert r.ok, r.error
    assert fired(tmp_path) == [f"fault-sigkill-step17-rank2-in-{inside}"] and r.failures == 1, r.events
    killed = fired_at(tmp_path)[f"fault-sigkill-step17-rank2-in-{inside}"]
    left = {p.name: float(p.read_text().split()[1]) - killed for p in tmp_path.glob("left-gen0-rank*")}
    assert sorted(left) == ["left-gen0-rank0", "left-gen0-rank1", "left-gen0-rank3"], left
    assert max(left.values()) < 1.0, left
    assert max(e["lost_steps"] for e in r.events if e["event"] == "recovered") <= 1
    assert r.metrics["model_kept"] == 1.0, r.metrics  # rank 0 survived
    assert_models_equal(reference[4], final_model(str(tmp_path / "run")))


@pytest.mark.slow  # ~20 s; test_resume covers stop + resume for DDP replicas
def test_stop_and_resume_equals_a_straight_run(reference, tmp_path):
    uri = tmp_path / "run"
    first = _fit(uri, 2, steps=STEPS // 2)
    assert first.ok, first.error
    again = _fit(uri, 2)
    assert again.ok, again.error
    assert [e["source"] for e in again.events if e["event"] == "restored"] == [f"checkpoint:{STEPS // 2}"] * 2
    assert_models_equal(reference[2], final_model(str(uri)))


def test_an_optimizer_built_before_sharding_is_named_in_one_line_at_restore(tmp_path):
    """The DDP order (optimizer, then prepare_model) under FSDP2: the optimizer holds the unsharded
    parameters, and the first commit failed with `KeyError: 0` on every rank. One rank, no Ray."""
    import torch
    import torch.distributed as dist

    from elastic.errors import ConfigError
    from elastic.train_state import TrainState
    from elastic._internal.worker.generation import Generation
    from elastic._internal.worker.groups import connect
    from elastic._internal.protocol import Assignment
    from worker_threads import make_services

    s = make_services(f"file://{tmp_path}", 1)[0]
    a = Assignment(generation=0, rank=0, world_size=1, store_host="", store_port=0, backend="gloo",
                   collective_timeout_s=20)
    groups = connect(a, s.clock, store=dist.HashStore())  # FSDP2's mesh needs a registered group
    gen = Generation(groups, torch.device("cpu"), s)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        early = torch.optim.AdamW(model.parameters(), lr=0.01)
        gen.prepare_model(model, strategy="fsdp")
        with pytest.raises(ConfigError) as err:
            gen.restore(TrainState(model=model, optimizer=early))
        assert "\n" not in str(err.value) and "build the optimizer after ctx.prepare_model" in str(err.value)
        state = TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01))
        assert gen.restore(state) is False  # the right order: a fresh run
        model(torch.randn(4, 8)).sum().backward()
        state.optimizer.step()
        gen.commit(state)
        assert state.step == 1
    finally:
        gen.release()
        groups.destroy()
