"""`elastic chaos` (elastic.chaos.tool) against a real run: it finds the workers, injects, stops."""

from __future__ import annotations

import threading

import pytest

from chaos_tests import harness
from elastic.chaos import tool

pytestmark = pytest.mark.timeout(120)


def test_parse_seconds():
    assert tool.parse_seconds("20s") == 20 and tool.parse_seconds("2m") == 120 and tool.parse_seconds("1.5") == 1.5
    assert tool.main(["file:///nowhere", "--faults", "node_remove"]) == 2


def test_tool_against_a_live_run(chaos_ray, tmp_path, chaos_seed):
    seed = chaos_seed(21)
    job = harness.Job(root=tmp_path, workers=2, steps=60, step_sleep=0.05, storage_wrapper=False)
    ref = harness.reference(tmp_path.parent, job)
    lines: list[str] = []
    reports = []
    t = threading.Thread(target=lambda: reports.append(tool.run_chaos(
        f"file://{job.run_dir}", mtbf_s=1.0, faults=["kill", "stop"], max_faults=2, duration_s=60, seed=seed,
        out=lines.append)), daemon=True)
    t.start()
    out = harness.run(job)
    t.join(30)
    print("\n".join(lines))
    rep = reports[0]
    assert 1 <= len(rep.actions) <= 2 and rep.ended_by in ("max_faults", "run_finished")
    assert any("chaos:" in ln and "pid=" in ln for ln in lines) and lines[-1].startswith("chaos: ")
    r = out.result
    assert r.ok, r.error
    assert 1 <= r.failures <= len(rep.actions)  # faults close together are one incident
    harness.check(out, ref, exact=True, expect_markers=0)
