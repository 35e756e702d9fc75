"""Shared pieces of the recovery and peer benchmarks: the job, the step log, and the analysis.

The job is the same everywhere: an MLP 512→1024→512→10 (≈1.06 M parameters) trained with SGD +
momentum on a fixed synthetic data set, global batch 64 split by `ElasticSampler`, one thread per
rank. Rank 0 of every arm appends one line per completed step to `steps.log` in its run directory:

    step  wall_time  generation  commit_seconds  checkpoint_seconds

`generation` is whatever the arm calls a new group (elastic's generation, torchrun's restart count,
a counter of Ray Train attempts). Faults are inflicted by the rank itself through
`elastic.chaos.faults.maybe_inject`, whose marker file holds `pid kill_time`. From these two files
`analyze_run` derives the kill time, the first step completed in the next group, lost steps and the
steady-state step time, identically for every arm.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

N_SAMPLES = 4096
IN_DIM, HIDDEN, CLASSES = 512, 1024, 10
GLOBAL_BATCH = 64
SEED = 0
STEP_LOG = "steps.log"


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N_SAMPLES, IN_DIM, generator=g)
    w = torch.randn(IN_DIM, CLASSES, generator=g)
    return x, (x @ w).argmax(1)


def make_model(hidden: int = HIDDEN) -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(IN_DIM, hidden), nn.ReLU(), nn.Linear(hidden, IN_DIM), nn.ReLU(),
                         nn.Linear(IN_DIM, CLASSES))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def make_sampler() -> Any:
    from elastic import ElasticSampler  # a pure function of (step, rank, world size): usable by every arm

    return ElasticSampler(num_samples=N_SAMPLES, global_batch_size=GLOBAL_BATCH, seed=SEED)


def train_step(ddp: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, sampler: Any,
               step: int, rank: int, world: int) -> float:
    idx = sampler.indices(step=step, rank=rank, world_size=world)
    loss = F.cross_entropy(ddp(x[idx]), y[idx], reduction="sum") * sampler.loss_scale(world)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.item())


class StepLog:
    """Rank 0's append-only per-step timestamp log (one flushed line per step)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool):
        self.f = open(os.path.join(run_dir, STEP_LOG), "a", buffering=1) if enabled else None

    def step(self, step: int, generation: int, commit_s: float = 0.0, ckpt_s: float = 0.0) -> None:
        if self.f is not None:
            self.f.write(f"{step} {time.time():.6f} {generation} {commit_s:.6f} {ckpt_s:.6f}\n")

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def read_steps(run_dir: str | os.PathLike) -> list[tuple[int, float, int, float, float]]:
    path = Path(run_dir) / STEP_LOG
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        p = line.split()
        if len(p) == 5:
            rows.append((int(p[0]), float(p[1]), int(p[2]), float(p[3]), float(p[4])))
    return rows


def read_kills(marker_dir: str | os.PathLike) -> list[tuple[str, int, float]]:
    """(marker name, pid, kill time) for every fault that fired, in time order."""
    out = []
    for p in Path(marker_dir).glob("fault-*"):
        pid, t = p.read_text().split()
        out.append((p.name, int(pid), float(t)))
    return sorted(out, key=lambda k: k[2])


@dataclass
class Recovery:
    kill_time: float
    kill_step: int  # the step the victim was about to run (= its committed step)
    last_old_step: int  # newest step rank 0 completed in the old group
    first_new_step: int  # first step completed in the next group
    first_new_time: float
    seconds: float  # kill → first step completed in the next group
    lost_steps: int  # completed steps that had to be recomputed


@dataclass
class RunAnalysis:
    step_times: list[float] = field(default_factory=list)  # steady-state intervals (no group change)
    recoveries: list[Recovery] = field(default_factory=list)
    ckpt_stalls: list[float] = field(default_factory=list)
    commit_s: list[float] = field(default_factory=list)
    steps: list[tuple[int, float, int]] = field(default_factory=list)  # (step, time, gen) for plots


def analyze_run(run_dir: str | os.PathLike, marker_dir: str | os.PathLike | None = None,
                skip_first: int = 5) -> RunAnalysis:
    rows = read_steps(run_dir)
    a = RunAnalysis(steps=[(s, t, g) for s, t, g, _, _ in rows])
    for i in range(1, len(rows)):
        (s0, t0, g0, _, _), (s1, t1, g1, c1, k1) = rows[i - 1], rows[i]
        if g1 == g0 and s1 == s0 + 1 and i > skip_first and k1 == 0.0:
            a.step_times.append(t1 - t0)
    a.ckpt_stalls = [k for *_, k in rows if k > 0]
    a.commit_s = [c for *_, c, k in rows if k == 0]
    for name, _pid, kt in read_kills(marker_dir) if marker_dir else []:
        kill_step = int(name.split("-step")[1].split("-")[0])
        before = [r for r in rows if r[1] <= kt]
        if not before:
            continue
        gen = before[-1][2]
        old = [r for r in rows if r[2] == gen]
        new = [r for r in rows if r[2] > gen]
        if not new:
            continue
        last_old = max(r[0] for r in old)
        first = new[0]
        a.recoveries.append(Recovery(kill_time=kt, kill_step=kill_step, last_old_step=last_old,
                                     first_new_step=first[0], first_new_time=first[1],
                                     seconds=first[1] - kt, lost_steps=max(0, last_old - (first[0] - 1))))
    return a


# -- statistics and output -------------------------------------------------------------------------
def med(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def spread(xs: Sequence[float], fmt: str = "{:.3f}") -> str:
    """'median (min–max)' or '—' when there is nothing to show."""
    if not xs:
        return "—"
    m = fmt.format(statistics.median(xs))
    return m if len(xs) == 1 else f"{m} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def check(ok: bool | None) -> str:
    return "?" if ok is None else ("✓" if ok else "✗")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | os.PathLike, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=lambda o: o.__dict__))


def machine_note() -> dict[str, Any]:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_1_5_15": [round(v, 2) for v in load], "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


# -- the elastic arm's training function (shipped to Ray workers by value) -------------------------
def elastic_train(config: dict) -> None:
    """config: steps, every (checkpoint interval), run_dir, marker_dir, faults, steps_after_resize."""
    import elastic
    from elastic.chaos.faults import maybe_inject, parse_faults

    t_enter = time.time()
    torch.set_num_threads(1)
    ctx = elastic.get_context()
    register_pid(config["run_dir"], ctx.rank, ctx.generation)
    x, y = make_data()
    model = make_model(config.get("hidden", HIDDEN))
    opt = make_optimizer(model)
    state = elastic.TrainState(model=model, optimizer=opt)
    t_setup = time.time()
    ctx.restore(state)
    t_restored = time.time()
    ddp = ctx.prepare_model(model)
    write_phase(config["run_dir"], ctx.generation, ctx.rank, t_enter, t_setup, t_restored)  # where re-entry goes
    sampler = make_sampler()
    faults = parse_faults(config.get("faults", []))
    steps = config["steps"]
    if config.get("steps_after_resize") and ctx.generation > 0:  # join runs: stop soon after growing
        steps = min(steps, state.step + config["steps_after_resize"])
    log = StepLog(config["run_dir"], ctx.rank == 0)
    try:
        while state.step < steps:
            maybe_inject(faults, step=state.step, rank=ctx.rank, marker_dir=config["marker_dir"])
            train_step(ddp, opt, x, y, sampler, state.step, ctx.rank, ctx.world_size)
            t0 = time.perf_counter()
            try:
                ctx.commit(state)
            except Exception as exc:  # a pause at a step boundary still completed the step
                if type(exc).__name__ == "PauseRequested":
                    _log_commit(log, state.step, ctx.generation, time.perf_counter() - t0, config["every"])
                raise
            _log_commit(log, state.step, ctx.generation, time.perf_counter() - t0, config["every"])
    finally:
        log.close()


def _log_commit(log: StepLog, step: int, generation: int, dt: float, every: int) -> None:
    due = every > 0 and step % every == 0
    log.step(step, generation, 0.0 if due else dt, dt if due else 0.0)


def read_phases(run_dir: str | os.PathLike) -> list[tuple[int, int, float, float, float, float]]:
    """(generation, rank, entered, set up, restored, ready) per rank per group, from phases.log."""
    path = Path(run_dir) / "phases.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        p = line.split()
        out.append((int(p[0]), int(p[1]), float(p[2]), float(p[3]), float(p[4]), float(p[5])))
    return out


def phase_breakdown(run_dir: str | os.PathLike, rec: Recovery) -> dict[str, float | None]:
    """kill → every rank of the next group entered the training code → restored → first step."""
    ph = [p for p in read_phases(run_dir) if p[2] > rec.kill_time and p[2] <= rec.first_new_time]
    if not ph:
        return {"restart": None, "restore": None, "first": None}
    entered = max(p[2] for p in ph)
    restored = max(p[4] for p in ph)
    return {"restart": entered - rec.kill_time, "restore": restored - entered, "first": rec.first_new_time - restored}


# -- processes: ports, process trees, torchrun jobs -----------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): torchrun's workers live in sessions of their own."""
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_torchrun(script: str, cfg: dict, *, world: int, restarts: int, fresh_store: bool, timeout: float) -> dict:
    """One torchrun job running `script --torchrun-worker cfg.json` on `world` local ranks; the whole
    process tree is killed when it ends or runs past `timeout`. fresh_store: a new rendezvous store
    per restart (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; the shared default makes restarted workers read
    the previous attempt's addresses)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if fresh_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    cfg_path = os.path.join(cfg["run_dir"], "cfg.json")
    Path(cfg_path).write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--nnodes=1",
           f"--max-restarts={restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           f"--rdzv-id={uuid.uuid4().hex[:8]}", "--monitor-interval=0.1", os.path.abspath(script),
           "--torchrun-worker", cfg_path]
    t0 = time.time()
    with open(os.path.join(cfg["run_dir"], "torchrun.log"), "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            kill_tree(proc)
    return {"rc": rc, "timed_out": rc is None, "total_s": time.time() - t0}


def register_pid(run_dir: str, rank: int, generation: int) -> None:
    """Record this process as a training rank (pids/<pid>: 'rank generation'): what an external
    failure schedule (bench_churn) picks its victims from, the same way for every arm."""
    d = os.path.join(run_dir, "pids")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, str(os.getpid())), "w") as f:
        f.write(f"{rank} {generation}\n")


def write_phase(run_dir: str, gen: int, rank: int, entered: float, setup: float, restored: float) -> None:
    """One line of phases.log (see read_phases): when this rank entered, set up, restored, was ready."""
    with open(os.path.join(run_dir, "phases.log"), "a") as f:
        f.write(f"{gen} {rank} {entered:.6f} {setup:.6f} {restored:.6f} {time.time():.6f}\n")


# -- plots -----------------------------------------------------------------------------------------
def plot_step_panels(panels: Sequence[tuple[str, Sequence[dict]]], path: str | os.PathLike, *,
                     origin: Any, xlabel: str) -> bool:
    """One panel per (title, runs): per arm, the steps rank 0 completed against wall time (its first
    run with steps), × at each kill. origin(run) -> the wall time plotted as 0. False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(max(9, 7 * len(panels)), 5), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        for arm in dict.fromkeys(r["arm"] for r in runs):
            r = next((x for x in runs if x["arm"] == arm and x["steps"]), None)
            if r is None:
                continue
            t0 = origin(r)
            line, = ax.plot([t - t0 for _, t, _ in r["steps"]], [s for s, _, _ in r["steps"]], ".-", ms=3, label=arm)
            for rec in r["recoveries"]:
                ax.plot(rec["kill_time"] - t0, rec["kill_step"], "x", ms=10, color=line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step completed (rank 0)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True
