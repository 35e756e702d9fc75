"""`elastic chaos` (elastic.chaos.tool) against a real run: it finds the workers, injects, stops."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from chaos_tests import harness
from elastic.chaos import tool
from elastic._internal.lease import Lease, this_process

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


def fake_worker(title: str = "ray::WorkerActor") -> subprocess.Popen:
    """A process that looks like a Ray worker actor (its title is its argv[0], as Ray's is)."""
    return subprocess.Popen([title, "-c", "import time; time.sleep(60)"], executable=sys.executable)


def write_group(run_dir, members: list[dict], *, at: float | None = None) -> None:
    (run_dir / "events.jsonl").write_text(json.dumps(
        {"event": "group_built", "time": time.time() if at is None else at, "generation": 3, "members": members}) + "\n")


def stop_all(ps: list[subprocess.Popen]) -> None:
    for p in ps:
        p.kill()
        p.wait(timeout=10)


def test_a_run_whose_driver_is_gone_is_refused_and_nothing_is_signalled(tmp_path, capsys):
    """Issue 25 item 8: after its driver was SIGKILLed a run's log still looks live; its lease says
    the driver is gone (here: the lease's pid was reused by another process), so chaos refuses."""
    ps = [fake_worker(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
    try:
        Lease(f"file://{tmp_path}").acquire(replace(this_process("orphan"), pid_start="1"))
        write_group(tmp_path, [{"worker": i, "rank": i, "pid": p.pid, "node_id": "aa"} for i, p in enumerate(ps)])
        code = tool.main([str(tmp_path), "--mtbf", "0.05s", "--faults", "kill", "--duration", "5s"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("error: ") == 1 and "does not hold its lease" in err and "driver" in err, err
        assert all(p.poll() is None for p in ps), "chaos signalled a process of a run that is not live"
    finally:
        stop_all(ps)


def test_only_this_runs_workers_are_signalled(tmp_path):
    """Issue 25 item 8: a PID in the log that is now another program, or a worker-titled process
    that started after the group was built (the pid was reused), is never signalled."""
    ps = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]), fake_worker()]
    try:
        Lease(f"file://{tmp_path}").acquire(this_process("live"))
        write_group(tmp_path, [{"worker": i, "rank": i, "pid": p.pid, "node_id": "aa"} for i, p in enumerate(ps)],
                    at=time.time() - 120)  # built two minutes ago: both processes are younger
        lines: list[str] = []
        rep = tool.run_chaos(f"file://{tmp_path}", mtbf_s=0.05, faults=["kill"], max_faults=1, duration_s=1.5,
                             seed=1, out=lines.append)
        assert rep.ended_by == "duration" and rep.actions == [], lines
        assert all(p.poll() is None for p in ps), "chaos signalled a process that is not this run's worker"
        assert any(f"not signalling pid {ps[0].pid}" in ln and "not a ray::WorkerActor" in ln for ln in lines), lines
        assert any(f"not signalling pid {ps[1].pid}" in ln and "reused" in ln for ln in lines), lines
    finally:
        stop_all(ps)


def test_node_fault_kills_every_worker_on_one_node_and_no_other(tmp_path):
    """`--faults node`: the drawn worker's node loses all its workers at once; other nodes keep theirs.
    Real processes and signals; the run is an event log naming them (no Ray needed to check the targeting)."""

    procs = [fake_worker() for _ in range(4)]
    Lease(f"file://{tmp_path}").acquire(this_process("live"))  # the run is live: this process holds its lease
    try:
        nodes = ["aa", "aa", "bb", "bb"]
        members = [{"worker": i, "rank": i, "pid": p.pid, "node_id": n} for i, (p, n) in enumerate(zip(procs, nodes))]
        write_group(tmp_path, members)
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
        stop_all(procs)
