"""Where a run trains: a job submitted with `ray job submit` to a real head trains on that cluster
(RAY_ADDRESS, token auth); two fit() calls of different sizes in one process both run; a
connected cluster that cannot place the run is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import elastic
from elastic.chaos import job as chaos_job
from elastic.chaos import procs
from elastic.errors import ConfigError
from elastic._internal.events import read_events

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    """A real `ray start --head` (with its dashboard: the Ray Jobs server), in a temp dir of its own,
    stopped by its own processes' ids: `ray stop` would end every Ray process on the machine,
    the suite's own clusters included."""

    def __init__(self, num_cpus: int):
        self.dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a limit
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")  # a client of a token cluster
        cmd = ["ray", "start", "--head", "--port", str(self.gcs_port), "--num-cpus", str(num_cpus),
               "--temp-dir", self.dir, "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dashboard_port), "--dashboard-agent-listen-port", str(_free_port()),
               "--ray-client-server-port", str(_free_port()), "--disable-usage-stats"]
        out = subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], env=self.env,
                             capture_output=True, text=True, timeout=90)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {out.stderr[-2000:]}")

    def pids(self) -> set[int]:
        roots = [p for p in procs.processes() if self.dir in p.title]
        found = {p.pid for p in roots}
        for r in roots:
            found |= {d.pid for d in procs.descendants(r.pid)}
        return found

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.dir, ignore_errors=True)


JOB = textwrap.dedent("""
    import json, sys
    import ray
    import elastic
    from elastic.chaos import job

    result = elastic.ElasticTrainer(job.train, train_loop_config={"steps": 8, "dropout": 0.0},
                                    scaling=elastic.ScalingConfig(min_workers=2, max_workers=2),
                                    checkpoint=elastic.CheckpointConfig(uri=sys.argv[1], every_n_steps=4)).fit(quiet=True)
    ctx = ray.get_runtime_context()
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print("JOB_RESULT " + json.dumps({"ok": result.ok, "steps": result.steps, "gcs": ctx.gcs_address, "nodes": nodes}))
""")


def test_a_submitted_job_trains_on_the_cluster_it_was_submitted_to(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    head = Head(num_cpus=3)
    try:
        script = tmp_path / "job.py"
        script.write_text(JOB)
        uri = f"file://{tmp_path}/run"
        ray_cli = str(Path(sys.executable).parent / "ray")
        out = subprocess.run([ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{head.dashboard_port}",
                              "--", sys.executable, str(script), uri],
                             env={**head.env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
        line = next(x for x in out.stdout.splitlines() if x.startswith("JOB_RESULT "))
        res = json.loads(line.split(" ", 1)[1])
        assert res["ok"] and res["steps"] == 8
        # The driver (ElasticTrainer) joined the cluster the job was submitted to, not a private one.
        assert res["gcs"].endswith(f":{head.gcs_port}"), res
        events = read_events(uri)
        started = next(e for e in events if e["event"] == "run_started")
        built = next(e for e in events if e["event"] == "group_built")
        # Its supervisor and workers ran on that cluster's node.
        assert started["supervisor_node_id"] in res["nodes"]
        assert {m["node_id"] for m in built["members"]} <= set(res["nodes"]), (built["members"], res["nodes"])
    finally:
        head.stop()
    assert not head.pids()


@pytest.mark.slow  # the address resolution it exercises has unit tests
def test_two_fits_of_different_sizes_in_one_process(tmp_path):
    """The second, larger run replaces the local cluster elastic started for the first (which would
    have waited and failed "cannot place")."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        sizes = []
        for n in (2, (os.cpu_count() or 2) + 1):
            r = elastic.ElasticTrainer(
                chaos_job.train, train_loop_config={"steps": 3, "dropout": 0.0},
                scaling=elastic.ScalingConfig(min_workers=n, max_workers=n, placement_timeout_s=30),
                checkpoint=elastic.CheckpointConfig(uri=f"file://{tmp_path}/run{n}", every_n_steps=0)).fit(quiet=True)
            assert r.ok, r.error
            sizes.append(max(e["world_size"] for e in r.events if e["event"] == "group_built"))
        assert sizes == [2, (os.cpu_count() or 2) + 1]
    finally:
        ray.shutdown()


def test_a_connected_cluster_that_cannot_place_the_run_is_refused_in_one_line(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        trainer = elastic.ElasticTrainer(chaos_job.train, train_loop_config={"steps": 1},
                                         scaling=elastic.ScalingConfig(min_workers=3, max_workers=3),
                                         checkpoint=elastic.CheckpointConfig(uri=f"file://{tmp_path}/run"))
        with pytest.raises(ConfigError) as err:
            trainer.fit(quiet=True)
        msg = str(err.value)
        assert "\n" not in msg and "CPU: 1 of 3" in msg and "ray.shutdown()" in msg, msg
        assert ray.cluster_resources().get("CPU") == 1  # the user's cluster is left as it was
    finally:
        ray.shutdown()
