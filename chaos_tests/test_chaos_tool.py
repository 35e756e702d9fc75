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


@pytest.mark.slow  # the tool's faults are the chaos suite's, run by every chaos test
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


def test_node_fault_kills_every_worker_on_one_node_and_no_other(tmp_path):
    """`--faults node`: the drawn worker's node loses all its workers at once; other nodes keep theirs.
    Real processes and signals; the run is an event log naming them (no Ray needed to check the targeting)."""
    import json
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(4)]
    try:
        nodes = ["aa", "aa", "bb", "bb"]
        members = [{"worker": i, "rank": i, "pid": p.pid, "node_id": n} for i, (p, n) in enumerate(zip(procs, nodes))]
        (tmp_path / "events.jsonl").write_text(
            json.dumps({"event": "group_built", "time": 0, "generation": 3, "members": members}) + "\n")
        lines: list[str] = []
        rep = tool.run_chaos(f"file://{tmp_path}", mtbf_s=0.05, faults=["node"], max_faults=1, duration_s=20, seed=5,
                             out=lines.append)
        assert rep.ended_by == "max_faults" and len(rep.actions) == 1, lines
        hit = set(rep.actions[0]["pids"])
        for p in procs:  # SIGKILL: reaped within the deadline, or the fault missed
            if p.pid in hit:
                assert p.wait(timeout=10) == -9
        node = {m["node_id"] for m in members if m["pid"] in hit}
        assert len(node) == 1 and hit == {m["pid"] for m in members if m["node_id"] in node}
        assert all(p.poll() is None for p in procs if p.pid not in hit)
        assert any(" node pid=" in ln for ln in lines), lines
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
