"""The ordinary events around a run (real `elastic run` processes, real signals): a second driver
on a live run's location, SIGTERM/SIGINT to the driver, resuming a copied run directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import elastic
from conftest import assert_models_equal, final_model
from elastic._internal.checkpoint import CheckpointStore
from elastic._internal.events import read_events
from elastic._internal.waiting import wait_until
import jobs

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "tests" / "jobs.py"
pytestmark = pytest.mark.timeout(240)
STEPS = 150


def cli(*args: str, **kw) -> subprocess.Popen:
    """`elastic ARGS` in a process of its own. `run` and `resume` join the module's Ray cluster
    (--address: what a driver on a real cluster does), which spares each a local cluster's start."""
    if args[0] in ("run", "resume"):
        import ray

        args = (*args, "--address", ray.get_runtime_context().gcs_address)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "elastic.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, **kw)


def run_args(uri: str, marker_dir: Path, *, steps: int = STEPS, step_sleep: float = 0.1) -> list[str]:
    marker_dir.mkdir(parents=True, exist_ok=True)
    return ["run", f"{JOBS}:train", "--min-workers", "2", "--checkpoint-uri", uri, "--every-n-steps", "1000",
            "--config", f"steps={steps}", "--config", f"step_sleep={step_sleep}", "--config", "trips=[12]",
            "--config", f"marker_dir={json.dumps(str(marker_dir))}", "--quiet"]


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """The final model of the same job, never stopped (in this process, on the module's Ray)."""
    uri = str(tmp_path_factory.mktemp("ref"))
    r = elastic.ElasticTrainer(jobs.train, train_loop_config={"steps": STEPS},
                               scaling=elastic.ScalingConfig(min_workers=2),
                               checkpoint=elastic.CheckpointConfig(uri=uri, every_n_steps=1000)).fit(quiet=True)
    assert r.ok, r.error
    return final_model(uri)


def _stop(sig: int, tmp_path: Path) -> tuple[str, subprocess.CompletedProcess]:
    """Start a run, stop its driver with `sig` after step 12; (its URI, the driver's outcome)."""
    uri, markers = str(tmp_path / "run"), tmp_path / "markers"
    driver = cli(*run_args(uri, markers))
    try:
        assert wait_until(lambda: (markers / "trip-step12").exists(), timeout_s=90, interval_s=0.1), \
            driver.stderr.read() if driver.poll() is not None else "no step 12"
        # A second driver on the live location is refused at once, naming the owner, touching nothing.
        second = cli(*run_args(uri, tmp_path / "m2"))
        out, err = second.communicate(timeout=60)
        assert second.returncode == 2 and "is in use by run jobs" in err, err
        driver.send_signal(sig)
        out, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    return uri, subprocess.CompletedProcess(driver.args, driver.returncode, out, err)


def _assert_stopped_committed(uri: str, p: subprocess.CompletedProcess, code: int) -> int:
    assert p.returncode == code, (p.returncode, p.stderr[-3000:])
    assert [line for line in p.stderr.splitlines() if line.startswith("stopped: ")], p.stderr[-2000:]
    stopped = [e for e in read_events(uri) if e["event"] == "run_stopped"]
    assert len(stopped) == 1 and stopped[0]["committed"], stopped
    store = CheckpointStore(uri)
    latest = store.latest_verified()
    # --every-n-steps 1000: without the stop nothing would have been committed before the end.
    assert latest is not None and 12 <= latest.step < STEPS and latest.step == stopped[0]["step"]
    assert store.verify(latest.step) == []
    return latest.step


def test_sigterm_commits_the_newest_state_and_a_resume_from_a_copy_ends_equal(reference, tmp_path):
    uri, p = _stop(signal.SIGTERM, tmp_path)
    stopped_at = _assert_stopped_committed(uri, p, 143)
    # Resume a copy: it trains from and into the copy; the original stays as it was.
    copy = str(tmp_path / "copy")
    shutil.copytree(uri, copy)
    before = sorted(os.listdir(Path(uri) / "checkpoints"))
    r = cli("resume", copy, "--quiet", "--config", "step_sleep=0")
    out, err = r.communicate(timeout=150)
    assert r.returncode == 0, err[-3000:]
    assert sorted(os.listdir(Path(uri) / "checkpoints")) == before
    assert CheckpointStore(uri).latest().step == stopped_at and CheckpointStore(copy).latest().step == STEPS
    assert_models_equal(reference, final_model(copy))


@pytest.mark.slow  # the same path as SIGTERM with another exit code (the controller tests cover 130 vs 143)
def test_sigint_commits_the_newest_state_too(tmp_path):
    uri, p = _stop(signal.SIGINT, tmp_path)
    _assert_stopped_committed(uri, p, 130)


def test_a_stop_commits_at_the_next_boundary_even_when_a_stop_timeout_is_shorter_than_two_steps(ray_local, tmp_path):
    """Issue 25 item 2: the pipelined vote acted one boundary late, so a stop with long steps missed its
    timeout and the late save committed after the run had declared it would not. One worker, 1.5 s
    steps, --stop-timeout 2.5, SIGTERM right after step 2: step 3 is committed and said to be."""
    uri, markers = str(tmp_path / "run"), tmp_path / "markers"
    markers.mkdir()
    driver = cli("run", f"{JOBS}:train", "--min-workers", "1", "--max-workers", "1", "--checkpoint-uri", uri,
                 "--every-n-steps", "1000", "--stop-timeout", "2.5", "--config", "steps=50",
                 "--config", "step_sleep=1.5", "--config", "trips=[2]",
                 "--config", f"marker_dir={json.dumps(str(markers))}", "--quiet")
    try:
        assert wait_until(lambda: (markers / "trip-step2").exists(), timeout_s=90, interval_s=0.05), \
            driver.stderr.read() if driver.poll() is not None else "no step 2"
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    stopped = [e for e in read_events(uri) if e["event"] == "run_stopped"]
    assert driver.returncode == 143 and len(stopped) == 1 and stopped[0]["committed"], (stopped, err[-3000:])
    assert stopped[0]["step"] == 3 and CheckpointStore(uri).latest_verified().step == 3
