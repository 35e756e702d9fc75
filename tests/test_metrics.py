"""Metrics: every committed step's metrics reach the driver (callbacks, URI/metrics.jsonl,
TensorBoard) through a failure; `elastic plot` draws them with the failure marked."""

from __future__ import annotations

import pytest
import torch

import elastic
from elastic.callbacks import Callback, Callbacks, TensorBoard
from elastic.chaos import job as chaos_job
from elastic._internal.events import read_events
from elastic._internal.metrics import read_metrics
from elastic._internal.plot import marks
from worker_threads import make_services, ok, run_generation

pytestmark = pytest.mark.timeout(120)


def test_rank0_records_every_step_and_reduce_averages_over_ranks(tmp_path):
    services = make_services(f"file://{tmp_path}/run", 3)

    def fn(gen):
        state = elastic.TrainState(model=torch.nn.Linear(2, 2))
        for _ in range(3):
            gen.commit(state, {"loss": float(gen.rank), f"only{gen.rank}": 1.0}, reduce=state.step == 2)
        gen.drain_vote()

    ok(run_generation(services, fn))
    recs = services[0].board.take_records()
    assert [r[0] for r in recs] == [1, 2, 3]
    assert recs[0][2] == {"loss": 0.0, "only0": 1.0}  # rank 0's own
    assert recs[2][2] == {"loss": 1.0, "only0": 1.0, "only1": 1.0, "only2": 1.0}  # each key's mean
    assert services[1].board.take_records() == [] and services[2].board.take_records() == []


class Recorder(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.events: list[str] = []
        self.result = None

    def on_step(self, step, metrics):
        assert "loss" in metrics and "time" not in metrics
        self.steps.append(step)

    def on_event(self, event):
        self.events.append(event["event"])

    def on_end(self, result):
        self.result = result


class Broken(Callback):
    calls = 0

    def on_step(self, step, metrics):
        Broken.calls += 1
        raise RuntimeError("a tracker that is down")


def test_a_run_with_a_failure_streams_every_step_to_callbacks_file_and_tensorboard(ray_local, tmp_path, capsys):
    steps = 30
    uri = f"file://{tmp_path}/run"
    rec = Recorder()
    trainer = elastic.ElasticTrainer(
        chaos_job.train, callbacks=[Broken(), rec, TensorBoard(tmp_path / "tb")],
        train_loop_config={"steps": steps, "step_sleep": 0.02, "marker_dir": str(tmp_path),
                           "faults": [{"kind": "sigkill", "step": 12, "rank": 1}]},
        scaling=elastic.ScalingConfig(min_workers=2, max_workers=2),
        checkpoint=elastic.CheckpointConfig(uri=uri, every_n_steps=10),
        failure=elastic.FailureConfig(max_failures=2))
    result = trainer.fit(quiet=True)
    assert result.ok and result.failures == 1
    # Every step once, in order (no step was lost, so none was trained twice), and the run's events.
    assert rec.steps == list(range(1, steps + 1)), rec.steps
    assert "worker_failed" in rec.events and rec.events[-1] == "run_finished" and rec.result is result
    assert Broken.calls == 1, "a callback that raised must not be called again"
    # The durable stream, in its own file: events.jsonl carries no per-step metrics.
    records = read_metrics(uri)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(isinstance(r["loss"], float) for r in records)
    events = read_events(uri)
    assert not any("loss" in e for e in events)
    m = marks(records, events)
    assert len(m["failures"]) == 1 and abs(m["failures"][0][0] - 12) <= 2, m
    # TensorBoard got every step's loss.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("loss")] == list(range(1, steps + 1))
    # `elastic plot` draws it (a real PNG), and says what it marked.
    from elastic.cli import main

    png = tmp_path / "loss.png"
    assert main(["plot", uri, "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "1 failures" in capsys.readouterr().out
    assert main(["plot", uri, "--out", str(png), "--metric", "nope"]) == 2
    assert "has loss" in capsys.readouterr().err


def test_callbacks_that_raise_are_dropped_once():
    class Bad(Callback):
        n = 0

        def on_event(self, event):
            Bad.n += 1
            raise ValueError("x")

    cbs = Callbacks([Bad()])
    cbs.events([{"event": "a"}, {"event": "b"}])
    cbs.steps([{"step": 1, "time": 0.0, "loss": 1.0}])
    assert Bad.n == 1
