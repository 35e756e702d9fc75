"""Unit: what churn costs, as a run reports it: the union of failures' lost time behind the ETTR, the
progress line, the end-of-run summary and `elastic plot` (no Ray; the controller's side is in
test_controller.py)."""

from __future__ import annotations

import io

import pytest

from elastic._internal.events import Event, EventLog, make
from elastic._internal.metrics import MetricsLog
from elastic._internal.plot import ettr, marks, plot
from elastic._internal.progress import ProgressPrinter, goodput
from elastic.result import Result
from elastic._internal.supervisor.tracking import Incidents, Progress, union_s
from elastic.testing.simulated import ManualClock

pytestmark = pytest.mark.timeout(60)


def test_lost_time_is_the_union_of_the_failures_intervals():
    assert union_s([]) == 0.0
    assert union_s([(0, 2), (5, 6)]) == 3.0                     # apart: summed
    assert union_s([(0, 4), (1, 2), (3, 6)]) == 6.0             # nested and overlapping: counted once
    assert union_s([(0, 4), (5, 6)], since=3.0) == 2.0          # before `since` (the first step): not counted


def test_an_open_failure_costs_until_now_and_a_resize_costs_nothing():
    clock = ManualClock(100.0)
    inc = Incidents(clock)
    first_step = 100.0
    clock.sleep(10.0)
    inc.start("grow", is_failure=False, step_before=60)
    clock.sleep(2.0)
    inc.start("rank(s) 1 died", is_failure=True, step_before=60)
    clock.sleep(3.0)                                            # 15 s in, 3 s of it in an open failure
    assert inc.lost_s(first_step) == pytest.approx(3.0) and inc.ettr(first_step) == pytest.approx(12 / 15)
    inc.restored(55, lost_steps=5)
    assert inc.close_past(60, generation=1, world_size=2) == [] and inc.restoring is False  # resumed, not recovered
    clock.sleep(1.0)
    recs = inc.close_past(61, generation=1, world_size=2)
    assert [(r.failure, r.cost_s, r.seconds, r.lost_steps) for r in recs] == [
        (False, 6.0, 5.0, 5), (True, 4.0, 3.0, 5)]
    clock.sleep(4.0)
    assert inc.lost_s(first_step) == pytest.approx(4.0) and inc.ettr(first_step) == pytest.approx(16 / 20)
    assert inc.ettr(None) is None


def test_the_progress_line_shows_ettr_failure_costs_and_standbys():
    p = Progress(state="running", step=120, loss=0.5, steps_per_s=9.0, world_size=4, generation=3,
                 failures=3, failure_cost_s=(0.4, 2.1, 0.3), ettr=0.9712, standbys=1)
    assert goodput(p) == "ETTR 0.97 · 3 failures (median 0.4 s, max 2.1 s) · standbys 1"
    assert goodput(Progress(failures=1, standbys=0)) == "1 failure · standbys 0"  # before the first step
    out = io.StringIO()
    ProgressPrinter(out=out).progress(p, force=True)
    assert out.getvalue().rstrip().endswith("gen 3  ETTR 0.97 · 3 failures (median 0.4 s, max 2.1 s) · standbys 1")


def _result(**kw) -> Result:
    recs = [{"reason": "rank(s) 1 died", "seconds": 0.2, "lost_steps": 1, "generation": g, "world_size": 2,
             "failure": True, "cost_s": c, "ettr": 0.9} for g, c in enumerate([0.5, 3.0, 1.0, 0.25], 1)]
    recs.insert(1, {"reason": "grow", "seconds": 1.0, "lost_steps": 0, "generation": 9, "world_size": 3,
                    "failure": False, "cost_s": 9.0, "ettr": 0.9})
    return Result(**{"ok": True, "exit_code": 0, "error": None, "metrics": {}, "steps": 100, "seconds": 60.0,
                     "failures": 4, "recoveries": recs, "checkpoint": None, "uri": "memory://r", **kw})


def test_the_summary_has_a_goodput_paragraph():
    text = _result(ettr=0.9123, lost_s=4.25).summary()
    # Failures only (not the resize): median of 0.25, 0.5, 1, 3 is 0.75; p90 and max are 3.
    assert ("goodput: 4 failure(s) cost median 0.75s, p90 3.00s, max 3.00s; 4.25s lost in all; ETTR 0.912"
            in text), text
    assert "recovery: rank(s) 1 died -> world size 2 in 0.20s, cost 0.50s, lost 1 step(s)" in text
    assert "goodput: no failures; 0.00s lost in all; ETTR 1.000" in _result(failures=0, recoveries=[],
                                                                              ettr=1.0).summary()
    assert "goodput" not in _result(ettr=None).summary()  # never stepped


def test_plot_labels_each_failure_with_its_cost_and_titles_the_ettr(tmp_path):
    uri = f"file://{tmp_path}/run"
    metrics, log = MetricsLog(uri), EventLog(uri)
    for step in range(1, 41):
        metrics.record({"step": step, "time": 1000.0 + step, "loss": 1.0 / step})
    log.record(make(Event.WORKER_FAILED, time=1012.5, worker=1, reason="rank(s) 1 died"))
    log.record(make(Event.RECOVERED, time=1015.5, reason="rank(s) 1 died", seconds=1.0, lost_steps=2,
                    generation=1, world_size=2, failure=True, cost_s=3.0, ettr=0.9))
    log.record(make(Event.RUN_FINISHED, time=1041.0, steps=40, error=None, seconds=41.0, failures=1,
                    recoveries=1, lost_s=3.0, ettr=0.925))
    metrics.close()
    log.close()
    from elastic._internal.events import read_events
    from elastic._internal.metrics import read_metrics

    records, events = read_metrics(uri), read_events(uri)
    assert marks(records, events)["costs"] == [(12, 3.0)]  # at the step where the failure was seen
    assert ettr(events) == 0.925 and ettr(events[:-1]) == 0.9 and ettr([]) is None
    png = tmp_path / "loss.png"
    said = plot(uri, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "their costs labelled, ETTR 0.925" in said, said
