"""Integration on a real local Ray: training runs, and a run stopped and resumed ends bitwise equal
to a run that never stopped."""

from __future__ import annotations

import pytest

import elastic
from conftest import assert_models_equal, final_model
from elastic._internal.events import read_events
import jobs

pytestmark = pytest.mark.timeout(180)


def _fit(uri: str, steps: int, workers: int = 2, **cfg) -> elastic.Result:
    return elastic.ElasticTrainer(
        jobs.train,
        train_loop_config={"steps": steps, **cfg},
        scaling=elastic.ScalingConfig(min_workers=workers, max_workers=workers, placement_timeout_s=30),
        checkpoint=elastic.CheckpointConfig(uri=uri, every_n_steps=10, keep_last=2),
        failure=elastic.FailureConfig(max_failures=0, collective_timeout_s=10),
    ).fit(quiet=True)


@pytest.mark.slow  # test_ownership stops a run with SIGTERM and resumes it to the same model
@pytest.mark.parametrize("workers", [2, 3])
def test_stop_and_resume_equals_straight_run(ray_local, tmp_path, workers):
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    r = _fit(str(straight), 40, workers)
    assert r.ok and r.steps == 40 and r.checkpoint.step == 40
    r1 = _fit(str(split), 25, workers)  # ends off the checkpoint interval: a final checkpoint at 25
    assert r1.checkpoint.step == 25
    r2 = _fit(str(split), 40, workers)
    assert r2.ok and r2.checkpoint.step == 40
    restored = [e for e in r2.events if e["event"] == "restored"]
    assert restored and all(e["source"] == "checkpoint:25" for e in restored)
    assert_models_equal(final_model(str(straight)), final_model(str(split)))


@pytest.mark.slow  # every run's events are checked by the recovery and chaos tests
def test_event_log_records_the_run(ray_local, tmp_path):
    r = _fit(str(tmp_path / "ev"), 20)
    names = [e["event"] for e in read_events(str(tmp_path / "ev"))]
    for needed in ("run_started", "worker_started", "group_built", "checkpoint_committed", "run_finished"):
        assert needed in names, f"{needed} missing from {names}"
    started = [e for e in r.events if e["event"] == "worker_started"]
    assert {e["rank"] for e in started} == {0, 1} and all(e["pid"] for e in started)
    built = [e for e in r.events if e["event"] == "group_built"]
    assert built[0]["world_size"] == 2 and built[0]["generation"] == 0
    assert r.metrics["loss"] > 0


@pytest.mark.slow  # test_checkpoint_dist reshards 2 -> 3 -> 2 through the same loader
def test_resume_at_another_world_size_continues(ray_local, tmp_path):
    uri = str(tmp_path / "reshard")
    _fit(uri, 20, workers=2)
    r = _fit(uri, 30, workers=3)
    assert r.ok and r.checkpoint.step == 30 and r.checkpoint.world_size == 3
