"""Run a job under a chaos plan and check what every chaos run must satisfy.

The driver (`fit()`) runs in the calling thread and external faults in a background thread (the
other way round when a multi-node cluster is driven: see `run`). The chaos side waits on conditions (a trip file the job writes at a step, an event in URI/events.jsonl), each
with a deadline, and claims a marker before it acts. `check()` asserts: the run finished (or failed
as documented), the final model equals the failure-free reference, every committed checkpoint
verifies, each fault fired exactly once and was followed by its recovery event, survivors kept
their PIDs, and no worker or supervisor process is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import elastic
from chaos_tests import chaos_job
from elastic.chaos import procs
from elastic.chaos.external import ExternalKind, Target, inflict
from elastic.chaos.faults import claim, fired_at
from elastic._internal.checkpoint import CheckpointStore
from elastic._internal.checkpoint.layout import COMMITTED
from elastic._internal.events import live_members, read_events
from elastic._internal.waiting import wait_until

SEED_ENV = "CHAOS_SEED"
ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-4


def seed_or(default: int) -> int:
    """The seed to use: CHAOS_SEED from the environment (to replay) or the test's fixed one."""
    raw = os.environ.get(SEED_ENV)
    return int(raw) if raw not in (None, "") else default


# -- the job ----------------------------------------------------------------------------------
@dataclass
class Job:
    root: Path
    """A fresh directory: the run lives in root/run, markers in root/markers."""
    workers: int = 2
    min_workers: int | None = None
    steps: int = 40
    every_n: int = 10
    keep_last: int = 3
    step_sleep: float = 0.02
    faults: list[dict] = field(default_factory=list)
    trips: list[int] = field(default_factory=list)
    max_failures: int = 5
    spares: int = 0
    standby_per_node: int = 1
    collective_timeout_s: float = 5.0
    poll_timeout_s: float = 2.0
    placement_timeout_s: float = 30.0
    storage_wrapper: bool = True
    """Run on chaosfs::file:// (storage rules can fire) instead of file://."""
    dropout: float = 0.1
    """0 for runs that resize: dropout masks are drawn per rank, so they change with the world size."""
    loader_workers: int | None = None
    """Read batches through ctx.data_loader with this many loader processes per rank (same batches)."""

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def marker_dir(self) -> Path:
        return self.root / "markers"

    @property
    def uri(self) -> str:
        return f"{'chaosfs::' if self.storage_wrapper else ''}file://{self.run_dir}"

    def config(self) -> dict:
        return {"steps": self.steps, "step_sleep": self.step_sleep, "dropout": self.dropout, "faults": list(self.faults),
                "trips": list(self.trips), "marker_dir": str(self.marker_dir),
                **({"loader_workers": self.loader_workers} if self.loader_workers is not None else {})}

    def trainer(self) -> elastic.ElasticTrainer:
        return elastic.ElasticTrainer(
            chaos_job.train, train_loop_config=self.config(),
            scaling=elastic.ScalingConfig(min_workers=self.min_workers or self.workers, max_workers=self.workers,
                                          spares=self.spares, standby_per_node=self.standby_per_node,
                                          placement_timeout_s=self.placement_timeout_s),
            checkpoint=elastic.CheckpointConfig(uri=self.uri, every_n_steps=self.every_n, keep_last=self.keep_last),
            failure=elastic.FailureConfig(max_failures=self.max_failures, collective_timeout_s=self.collective_timeout_s,
                                          poll_timeout_s=self.poll_timeout_s))

    def cli_args(self) -> list[str]:
        """`elastic run` arguments for the same job (the driver-kill fault runs it in a subprocess)."""
        import json

        args = ["run", f"{ROOT}/chaos_tests/chaos_job.py:train", "--checkpoint-uri", self.uri,
                "--min-workers", str(self.min_workers or self.workers), "--max-workers", str(self.workers),
                "--every-n-steps", str(self.every_n), "--keep-last", str(self.keep_last),
                "--max-failures", str(self.max_failures), "--collective-timeout", str(self.collective_timeout_s),
                "--quiet"]
        for k, v in self.config().items():
            args += ["--config", f"{k}={json.dumps(v)}"]
        return args


# -- external faults --------------------------------------------------------------------------
@dataclass(frozen=True)
class Trigger:
    """When an external fault acts: `trip` (the job reached step `value`), `commit` (a checkpoint
    at step >= value committed), `time` (`value` s after the first group was built), `after` (an
    event named in `value` appeared after the previous fault), `standby` (an idle standby is ready,
    not one an earlier action hit, and the job reached step `value` when not None)."""

    kind: str
    value: Any


@dataclass(frozen=True)
class Action:
    kind: ExternalKind
    trigger: Trigger
    rank: int | None = None
    """Signal kinds: the rank whose worker to hit (in the newest group, minus those already lost)."""
    step: int | None = None
    """corrupt_shard: the committed step (default: the newest)."""
    num_cpus: int = 1
    """node_add: CPUs of the new node."""
    standby: bool = False
    """Signal kinds: hit an idle standby (ready, in no group) instead of a rank."""


class Chaos(threading.Thread):
    """Carries out a list of external actions, in order, against one run."""

    def __init__(self, job: Job, actions: list[Action], *, cluster: Any = None,
                 driver: subprocess.Popen | None = None, deadline_s: float = 90.0):
        super().__init__(name="chaos", daemon=True)
        self.job, self.actions, self.cluster, self.driver = job, actions, cluster, driver
        self.deadline = time.monotonic() + deadline_s
        self.stop = threading.Event()
        self.log: list[dict] = []
        self.error: str | None = None

    def _events(self) -> list[dict]:
        return read_events(f"file://{self.job.run_dir}")

    def _wait(self, cond) -> Any:
        if self.stop.is_set():
            return None
        return wait_until(cond, timeout_s=max(0.0, self.deadline - time.monotonic()), interval_s=0.02,
                          sleep=self.stop.wait)

    def _idle_standbys(self) -> list[procs.Proc]:
        """The idle standbys not hit by an earlier action (a killed one may linger a moment)."""
        hit = {entry["pid"] for entry in self.log}
        return [p for p in idle_standbys(self._events()) if p.pid not in hit]

    def _trigger(self, t: Trigger, since: float) -> bool:
        if t.kind == "now":
            return True
        if t.kind == "trip":
            return bool(self._wait(lambda: (self.job.marker_dir / f"trip-step{t.value}").exists()))
        if t.kind == "commit":
            return bool(self._wait(lambda: any(e["event"] == "checkpoint_committed" and e["step"] >= t.value
                                               for e in self._events())))
        if t.kind == "time":
            built = self._wait(lambda: [e for e in self._events() if e["event"] == "group_built"])
            if not built:
                return False
            return not self.stop.wait(max(0.0, built[0]["time"] + t.value - time.time()))
        if t.kind == "standby":
            if t.value is not None and not self._trigger(Trigger("trip", t.value), since):
                return False
            return bool(self._wait(self._idle_standbys))
        if t.kind == "after":
            names = (t.value,) if isinstance(t.value, str) else tuple(t.value)
            return bool(self._wait(lambda: any(e["event"] in names and e["time"] > since for e in self._events())))
        raise ValueError(t.kind)

    def run(self) -> None:
        since = 0.0
        try:
            for i, a in enumerate(self.actions):
                if not self._trigger(a.trigger, since):
                    self.error = f"action {i} ({a.kind.value}) never triggered ({a.trigger})"
                    return
                target = Target(cluster=self.cluster, driver=self.driver, num_cpus=a.num_cpus, uri=self.job.uri)
                rank = None
                if a.standby:
                    idle = self._wait(self._idle_standbys) or []
                    if not idle:
                        self.error = f"action {i} ({a.kind.value}): no idle standby"
                        return
                    target.pid = idle[0].pid
                elif a.kind.targets_worker or a.kind is ExternalKind.NODE_REMOVE:
                    members = self._wait(lambda: live_members(self._events())[1]) or []
                    pick = [m for m in members if m["rank"] == a.rank] or members
                    if not pick:
                        self.error = f"action {i} ({a.kind.value}): no live worker"
                        return
                    target.pid, target.node_id, rank = pick[0]["pid"], pick[0]["node_id"], pick[0]["rank"]
                if a.kind is ExternalKind.CORRUPT_SHARD:
                    info = CheckpointStore(self.job.uri).latest()
                    target.step = a.step if a.step is not None else (info.step if info else None)
                name = f"fault-ext-{i}-{a.kind.value}"
                if claim(self.job.marker_dir, name, f"pid={target.pid} rank={rank}"):
                    t = time.time()
                    what = inflict(a.kind, target)
                    self.log.append({"time": t, "kind": a.kind.value, "pid": target.pid, "rank": rank, "what": what,
                                     "step": target.step})
                    since = t
        except Exception as exc:  # noqa: BLE001 - reported by check()
            self.error = f"{type(exc).__name__}: {exc}"


def idle_standbys(events: list[dict]) -> list[procs.Proc]:
    """Worker processes (below this one) that are ready and in no group: standbys. A process still
    starting is titled `ray::WorkerActor.__init__`; a ready one `ray::WorkerActor` or the method it
    runs now (`.watch`, or `.heartbeat`/`.info` for a moment: a threaded actor's title follows its
    latest call, so waiting for `.watch` alone can miss a ready standby for good). None before a
    group_built event is in `events`: the supervisor writes its events out every second, and the
    first group's ranks, ready a moment before, would look like standbys until then."""
    built = [e for e in events if e["event"] == "group_built"]
    if not built:
        return []
    members = {m["pid"] for e in built for m in e["members"]}
    return [p for p in procs.actor_processes("WorkerActor")
            if p.pid not in members and not p.title.endswith(".__init__")]


# -- running ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    job: Job
    result: Any  # elastic.Result | None
    raised: str | None
    chaos: Chaos
    seconds: float
    exit_codes: list[int] = field(default_factory=list)
    """Driver-subprocess runs: the exit codes of `elastic run` and `elastic resume`."""

    @property
    def events(self) -> list[dict]:
        return read_events(f"file://{self.job.run_dir}")

    @property
    def recoveries(self) -> list[dict]:
        return [e for e in self.events if e["event"] in ("recovered", "resized")]


def run(job: Job, actions: list[Action] = (), *, cluster: Any = None, timeout_s: float = 150.0) -> Outcome:
    """Run `job` with `actions` inflicted on it. With a `cluster`, the chaos runs on the calling
    (main) thread and the driver in a thread: `Cluster.add_node` installs signal handlers, which
    only the main thread may do."""
    job.marker_dir.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(job, list(actions), cluster=cluster)
    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = job.trainer().fit(raise_on_failure=False, quiet=True)
        except Exception as exc:  # noqa: BLE001 - e.g. the supervisor was killed under fit()
            box["raised"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            chaos.stop.set()

    t0 = time.monotonic()
    if cluster is None:
        chaos.start()
        fit()
        chaos.join(10)
    else:
        driver = threading.Thread(target=fit, name="driver", daemon=True)
        driver.start()
        chaos.run()
        driver.join(timeout_s)
        if driver.is_alive():
            box["raised"] = f"fit() did not return within {timeout_s:g}s"
    return Outcome(job, box.get("result"), box.get("raised"), chaos, time.monotonic() - t0)


def resume(job: Job) -> Any:
    """Continue the run at job's URI, as `elastic resume` does (same spec, in this process)."""
    return job.trainer().fit(raise_on_failure=False, quiet=True)


def run_driver(job: Job, actions: list[Action], address: str, timeout_s: float = 90) -> Outcome:
    """`elastic run` in a driver subprocess under chaos, then `elastic resume URI` until it ends."""
    job.marker_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "elastic.cli"]
    t0 = time.monotonic()
    driver = subprocess.Popen(cli + job.cli_args() + ["--address", address], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chaos = Chaos(job, list(actions), driver=driver)
    chaos.start()
    codes = []
    try:
        driver.wait(timeout_s)
    finally:
        driver.kill()
        chaos.stop.set()
        chaos.join(10)
    codes.append(driver.returncode)
    # The supervisor and its workers die with their owner; wait until they are gone, then resume.
    procs.wait_gone(timeout_s=30)
    res = subprocess.run(cli + ["resume", job.uri, "--address", address, "--quiet"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout_s)
    codes.append(res.returncode)
    raised = None if res.returncode == 0 else f"resume exit {res.returncode}: {res.stderr.strip()[-500:]}"
    return Outcome(job, None, raised, chaos, time.monotonic() - t0, exit_codes=codes)


# -- the reference ----------------------------------------------------------------------------
_REFERENCES: dict[tuple, dict] = {}


def reference(tmp_root: Path, job: Job) -> dict[str, torch.Tensor]:
    """The final model of the same job without faults (cached per shape of job)."""
    key = (job.workers, job.steps, job.every_n, job.dropout)
    if key not in _REFERENCES:
        clean = Job(root=tmp_root / f"ref-{job.workers}-{job.steps}-{job.every_n}-{time.time_ns()}",
                    workers=job.workers, steps=job.steps, every_n=job.every_n, step_sleep=0.0,
                    storage_wrapper=False, dropout=job.dropout)
        r = clean.trainer().fit(raise_on_failure=False, quiet=True)
        assert r.ok, f"the failure-free reference run failed: {r.error}"
        _REFERENCES[key] = CheckpointStore(clean.uri).load_full()["model"]
    return _REFERENCES[key]


# -- the checks -------------------------------------------------------------------------------
FOLLOW = {
    "sigterm": ("resized",), "node_add": ("resized",), "storage": ("checkpoint_committed",),
    "corrupt_shard": ("restored",), "kill_supervisor": ("run_finished",), "kill_driver": ("run_finished",),
}
"""What must follow each fault kind in events.jsonl (default: recovered or resized)."""


def model_diff(a: dict, b: dict) -> float:
    """The largest per-tensor max|a-b| / max|b|."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)


def marker_kind(name: str) -> str:
    if name.startswith("fault-storage-"):
        return "storage"
    if name.startswith("fault-ext-"):
        return name.split("-", 3)[3]
    return name.split("-")[1]


def check(out: Outcome, ref: dict | None, *, exact: bool, expect_markers: int, expect_failed: bool = False,
          corrupted: tuple[int, ...] = ()) -> dict:
    """Assert everything a chaos run must satisfy; returns figures for the matrix table."""
    job = out.job
    assert out.chaos.error is None, f"chaos thread: {out.chaos.error}"
    events = out.events
    # 1. finished, or failed as documented with a committed checkpoint.
    if expect_failed:
        assert out.result is not None and not out.result.ok and out.result.exit_code == 1, out.result
        assert "failure budget spent" in (out.result.error or "") or "below min_workers" in (out.result.error or "")
        assert out.result.checkpoint is not None, "a failed run must leave a committed checkpoint"
    else:
        assert out.raised is None, out.raised
        if out.result is not None:
            assert out.result.ok, f"run failed: {out.result.error}"
        assert events and events[-1]["event"] == "run_finished", events[-1:] if events else "no events"
    store = CheckpointStore(job.uri)
    corrupted = tuple(corrupted) + tuple(a["step"] for a in out.chaos.log if a["kind"] == "corrupt_shard")
    # 2. every committed checkpoint verifies (a step the test corrupted is exempt until rewritten).
    infos = store.list()
    for info in infos:
        if info.status == COMMITTED and info.step not in corrupted:
            assert store.verify(info.step) == [], f"committed step {info.step} does not verify"
    # 3. the final model.
    diff = None
    if not expect_failed:
        latest = store.latest()
        assert latest is not None and latest.step == job.steps, latest
        model = store.load_full()["model"]
        diff = model_diff(model, ref)
        if exact:
            bad = [k for k in model if not torch.equal(model[k], ref[k])]
            assert not bad, f"not bitwise equal to the reference: {bad} (max rel diff {diff:.3g})"
        else:
            assert diff <= REL_TOL, f"max rel diff {diff:.3g} > {REL_TOL}"
    # 4. each fault fired exactly once, and was followed by its recovery event.
    fired = fired_at(job.marker_dir)
    assert len(fired) == expect_markers, f"fired {sorted(fired)}, expected {expect_markers} fault(s)"
    for name, t in fired.items():
        kind = marker_kind(name)
        want = FOLLOW.get(kind, ("recovered", "resized")) + (("run_failed",) if expect_failed else ())
        assert any(e["event"] in want and e["time"] >= t for e in events), f"{name}: no {want} after it"
    # 5. survivors kept their processes (per run segment: generations restart at 0 on resume).
    check_survivors(events)
    # 6. nothing left running.
    left = procs.wait_gone(timeout_s=20)
    assert not left, f"left running: {left}"
    recs = [e for e in events if e["event"] in ("recovered", "resized")]
    print(f"run {out.seconds:.1f}s, recoveries {[(e['reason'], e['seconds'], e['lost_steps']) for e in recs]}")
    return {"diff": diff, "recovery_s": [e["seconds"] for e in recs],
            "lost": max([e["lost_steps"] for e in recs], default=0), "ok": not expect_failed}


COLD_START_S = 6.0
"""A replacement's cold start on a loaded 2-core machine (a Ray worker process and a torch import,
measured 2.5-3 s), with room to spare."""


def churn_bound_s(job: Job, liveness_interval_s: float = 1.0) -> float:
    """The longest a recovery (or any wait between two events) may take under churn: the
    failure-detection bound (liveness interval + poll timeout) plus one cold start."""
    return liveness_interval_s + job.poll_timeout_s + COLD_START_S


def check_churn(events: list[dict], *, bound_s: float) -> dict:
    """What a run under churn must also satisfy, with at most one rank lost at a time (a survivor
    always holds the newest state): no restore from a checkpoint after the first generation, every
    recovery within `bound_s`, and no gap between consecutive events longer than `bound_s` (no wait
    past the failure-detection bound plus one cold start)."""
    ckpt = [e for e in events if e["event"] == "restored" and e["generation"] > 0
            and str(e["source"]).startswith("checkpoint")]
    assert not ckpt, f"restored from a checkpoint while a survivor held the newest state: {ckpt}"
    lost = [e for e in events if e["event"] == "restored" and e["generation"] > 0 and e.get("lost_steps")]
    assert not lost, f"steps lost although a survivor held them: {lost}"
    slow = [(e["generation"], e["reason"], e["seconds"]) for e in events
            if e["event"] in ("recovered", "resized") and e["seconds"] > bound_s]
    assert not slow, f"recoveries longer than {bound_s:g}s: {slow}"
    # From the first group on: the run's own start-up (Ray starting its first workers) is no wait.
    first = next(i for i, e in enumerate(events) if e["event"] == "group_built")
    later = events[first:]
    gaps = [(round(b["time"] - a["time"], 2), a["event"], b["event"]) for a, b in zip(later, later[1:])
            if b["time"] - a["time"] > bound_s]
    assert not gaps, f"waits longer than {bound_s:g}s between events: {gaps}"
    return {"generations": max(e["generation"] for e in events if e["event"] == "group_built"),
            "recovery_s": [e["seconds"] for e in events if e["event"] in ("recovered", "resized")]}


def check_survivors(events: list[dict]) -> None:
    prev: dict | None = None
    gone: set[int] = set()
    for e in events:
        if e["event"] == "run_started":
            prev, gone = None, set()
        elif e["event"] in ("worker_failed", "worker_left"):
            gone.add(e["worker"])
        elif e["event"] == "group_built":
            if prev is not None:
                now = {m["worker"]: m["pid"] for m in e["members"]}
                for m in prev["members"]:
                    if m["worker"] in gone:
                        assert m["pid"] not in now.values(), f"lost worker {m} is back in generation {e['generation']}"
                    else:
                        assert now.get(m["worker"]) == m["pid"], \
                            f"survivor {m} missing from generation {e['generation']}: {e['members']}"
            prev, gone = e, set()
