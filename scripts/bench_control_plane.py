"""The control plane at scale: what the supervisor costs as the number of ranks grows.

    python scripts/bench_control_plane.py --out bench_out/control_plane            # everything
    python scripts/bench_control_plane.py --parts sim store log --out DIR          # no real Ray

Parts (each prints a table; all go to DIR/control_plane.json and DIR/control_plane.png):
- sim:   the real controller and policies over N simulated workers in process (no Ray, no torch,
         injected clock; elastic.testing.simulated), N = 100, 1,000, 10,000: the controller's
         CPU per look at its workers while nothing fails (x 10 looks/s = cores), and the wall time
         from a worker's death being observable to the decision (group_failed) and to the next
         group's assignments being handed out; the same for a whole node lost.
- ray:   the real RayWorkerGroup and controller over N stand-in actors on real Ray on this machine
         (elastic.testing.standin: the worker protocol, no torch, no CPU reserved): the
         supervisor's cycle time and CPU, Ray's own CPU (raylet + GCS), and the time from SIGKILL
         of one stand-in to the failure decision.
- store: the rendezvous store (a TCPStore, libuv, as the supervisor hosts it) under N concurrent
         clients doing one generation's key exchange (each sets its address, reads every peer's:
         what gloo's full mesh does), N = 16 ... 256, clients as threads of one process.
- log:   the event log: time per flush and memory as it grows to 10^5 events, on file:// (append)
         and on the moto S3 server (rolling segments); the manifest's size and parse time by ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))




# -- (a) simulated ---------------------------------------------------------------------------
def sim_one(n: int, fault: str, per_node: int = 8) -> dict[str, Any]:
    from elastic.config import FailureConfig, RunConfig, ScalingConfig
    from elastic._internal.supervisor.controller import Controller
    from elastic.testing.simulated import ManualClock, NullEvents, SimulatedGroup
    from elastic._internal.supervisor.states import Starting, StateType

    group = SimulatedGroup(n, per_node=per_node)
    clock = ManualClock()
    events = NullEvents(watch=("group_failed",))
    run = RunConfig(scaling=ScalingConfig(min_workers=max(1, n // 2), max_workers=n),
                    failure=FailureConfig(max_failures=5, poll_timeout_s=2, collective_timeout_s=5))
    ctl = Controller(run, group, events, ("127.0.0.1", 1), clock=clock, sleep=clock.sleep)
    state: Any = Starting()
    t0 = time.perf_counter()
    while state.type is not StateType.RUNNING:
        state = ctl.transition(state)
    start_s = time.perf_counter() - t0
    for _ in range(10):
        state = ctl.transition(state)
    looks = []
    for _ in range(30):
        c0 = time.process_time()
        state = ctl.transition(state)
        looks.append(time.process_time() - c0)
    look_s = statistics.median(looks)
    group.marks.clear()
    events.first.clear()
    if fault == "worker":
        group.die_at[ctl.members[n // 3]] = group.step
    else:
        group.remove_node(1)
    while "ordered" not in group.marks:
        state = ctl.transition(state)
    m = group.marks
    return {"n": n, "fault": fault, "start_s": start_s, "look_ms": look_s * 1e3,
            "cores_while_running": look_s / run.failure.poll_interval_s,
            "to_decision_s": events.first["group_failed"] - m["observable"],
            "to_ordered_s": m["ordered"] - m["observable"], "world_after": len(ctl.members)}


def part_sim(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        for fault in ("worker", "node"):
            r = sim_one(n, fault)
            rows.append(r)
            print(f"sim n={n:>6} {fault:<6} look {r['look_ms']:8.2f} ms ({r['look_ms'] / 1e3 * 10:.3f} cores at 10 "
                  f"looks/s)  death->decision {r['to_decision_s'] * 1e3:8.1f} ms  ->rebuild ordered "
                  f"{r['to_ordered_s'] * 1e3:8.1f} ms  (world after {r['world_after']})", flush=True)
    return rows


# -- (b) real Ray stand-ins ------------------------------------------------------------------
def part_ray(sizes: list[int], window_s: float) -> list[dict[str, Any]]:
    import ray

    from elastic.chaos import procs
    from elastic.testing.standin import measure

    rows = []
    for n in sizes:
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_pids = tuple(p.pid for p in procs.descendants() if "raylet" in p.title or "gcs_server" in p.title)
        try:
            r = measure(n, window_s=window_s, ray_pids=ray_pids, start_timeout_s=max(300.0, 3.0 * n))
        finally:
            ray.shutdown()
        rows.append(r)
        print(f"ray n={n:>4}: started in {r['start_s']:.1f}s; cycle median {r['cycle_ms_median']:.2f} ms "
              f"(p95 {r['cycle_ms_p95']:.1f}); supervisor {r['supervisor_cores']:.3f} cores, raylet+GCS "
              f"{r['ray_cores']:.3f}, stand-ins {r['standin_cores']:.3f}; SIGKILL -> decision {r['detect_s']:.3f}s",
              flush=True)
    return rows


# -- (c) the rendezvous store ----------------------------------------------------------------
def part_store(sizes: list[int]) -> list[dict[str, Any]]:
    from datetime import timedelta

    import torch.distributed as dist

    from elastic._internal.supervisor.actor import bind_store

    rows = []
    for n in sizes:
        server, sock = bind_store("127.0.0.1", 60)
        port = server.port
        prefix = f"gen{n}/"
        barrier = threading.Barrier(n + 1)
        errors: list[BaseException] = []
        done = [0.0] * n

        def client(r: int) -> None:
            try:
                s = dist.PrefixStore(prefix, dist.TCPStore("127.0.0.1", port, is_master=False,
                                                           timeout=timedelta(seconds=60)))
                barrier.wait()
                s.set(f"addr{r}", ("x" * 60).encode())
                for peer in range(n):  # gloo's full mesh: every rank reads every peer's address
                    s.get(f"addr{peer}")
                done[r] = time.perf_counter()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                try:
                    barrier.abort()
                except Exception:  # noqa: BLE001
                    pass

        threads = [threading.Thread(target=client, args=(r,), daemon=True) for r in range(n)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join(120)
        if errors:
            raise RuntimeError(f"store n={n}: {errors[0]!r}")
        rows.append({"n": n, "exchange_s": max(done) - t0, "gets": n * n})
        print(f"store n={n:>4}: one generation's exchange {rows[-1]['exchange_s'] * 1e3:8.1f} ms ({n * n} gets)",
              flush=True)
        sock.detach()  # the store owns the fd now, and closes it with itself
        del server
    return rows


# -- (d) the event log and the manifest ------------------------------------------------------
def _log_flushes(uri: str, total: int, every: int, append: bool | None) -> list[tuple[int, float]]:
    from elastic._internal.events import Event, EventLog

    log = EventLog(uri, flush_interval_s=1e9, append=append)
    out = []
    tracemalloc.start()
    for i in range(1, total + 1):
        log.emit(Event.CHECKPOINT_COMMITTED, step=i, seconds=0.01, bytes=123456, world_size=1000, uri=uri)
        if i % every == 0:
            t0 = time.perf_counter()
            log.flush()
            out.append((i, time.perf_counter() - t0))
    _cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert log.write_errors == 0, log.write_errors
    out.append((-1, float(peak)))
    return out


def part_log(tmp: Path, s3: bool) -> dict[str, Any]:
    from elastic._internal.checkpoint.layout import FileEntry, Manifest

    res: dict[str, Any] = {}
    targets = [("file", f"file://{tmp}/log-file", None, 100_000, 100)]
    endpoint = None
    if s3:
        endpoint = _moto()
        targets.append(("s3", "s3://bench-logs/run", False, 100_000, 1000))
    for name, uri, append, total, every in targets:
        flushes = _log_flushes(uri, total, every, append)
        peak = flushes.pop()[1]
        by_decade = {}
        for dec in (10**2, 10**3, 10**4, 10**5):
            window = [dt for i, dt in flushes if dec // 10 < i <= dec] or [dt for i, dt in flushes if i <= dec][-3:]
            if window:
                by_decade[dec] = statistics.median(window)
        res[name] = {"flush_ms_by_events": {k: v * 1e3 for k, v in by_decade.items()}, "peak_mb": peak / 1e6,
                     "every": every}
        print(f"log {name:<4} (flush every {every}): " + "  ".join(f"{k:>6} events {v * 1e3:7.2f} ms"
                                                                  for k, v in by_decade.items())
              + f"  peak python memory {peak / 1e6:.1f} MB", flush=True)
    man = []
    for n in (100, 1000, 10_000):
        m = Manifest(step=1, world_size=n, time=0.0, seconds=1.0, save_id="x",
                     files={f"__{r}_abcdef_0.distcp": FileEntry(size=10**8, checksum=r, rank=r) for r in range(n)})
        t0 = time.perf_counter()
        data = m.to_json()
        t1 = time.perf_counter()
        Manifest.from_json(data, "bench")
        t2 = time.perf_counter()
        man.append({"n": n, "bytes": len(data), "write_ms": (t1 - t0) * 1e3, "parse_ms": (t2 - t1) * 1e3})
        print(f"manifest n={n:>6}: {len(data) / 1e3:8.1f} kB, to_json {man[-1]['write_ms']:.1f} ms, parse "
              f"{man[-1]['parse_ms']:.1f} ms", flush=True)
    res["manifest"] = man
    return res


def _moto() -> str:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "AKIAFAKE", "AWS_SECRET_ACCESS_KEY": "fake", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    import fsspec

    fsspec.filesystem("s3").mkdir("bench-logs")
    return f"http://{host}:{port}"


# -- the plot --------------------------------------------------------------------------------
def plot(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    if data.get("sim"):
        ax = axes[0]
        for fault, style in (("worker", "o-"), ("node", "s--")):
            rows = [r for r in data["sim"] if r["fault"] == fault]
            ax.plot([r["n"] for r in rows], [r["to_ordered_s"] for r in rows], style, label=f"{fault} lost -> rebuild ordered")
        rows = [r for r in data["sim"] if r["fault"] == "worker"]
        ax.plot([r["n"] for r in rows], [r["look_ms"] / 1e3 * 10 for r in rows], "^:", label="cores while nothing fails")
        for r in data.get("ray") or []:
            ax.plot([r["n"]], [r["supervisor_cores"]], "kx")
        ax.axhline(1.0, color="tab:red", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("ranks (simulated; x: real Ray stand-ins)")
        ax.set_title("supervisor: seconds / cores", fontsize=9)
        ax.legend(fontsize=7)
    if data.get("store"):
        ax = axes[1]
        ax.plot([r["n"] for r in data["store"]], [r["exchange_s"] for r in data["store"]], "o-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients")
        ax.set_title("rendezvous store: one generation's exchange (s)", fontsize=9)
    if data.get("log"):
        ax = axes[2]
        for name in ("file", "s3"):
            if name in data["log"]:
                d = data["log"][name]["flush_ms_by_events"]
                ax.plot([int(k) for k in d], list(d.values()), "o-", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("events logged so far")
        ax.set_title("event log: ms per flush", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["sim", "ray", "store", "log"])
    p.add_argument("--sim-sizes", type=int, nargs="+", default=[100, 1000, 10_000])
    p.add_argument("--ray-sizes", type=int, nargs="+", default=[50, 100, 200])
    p.add_argument("--store-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--out", default="bench_out/control_plane")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if "sim" in args.parts:
        data["sim"] = part_sim(args.sim_sizes)
    if "store" in args.parts:
        data["store"] = part_store(args.store_sizes)
    if "log" in args.parts:
        data["log"] = part_log(out, not args.no_s3)
    if "ray" in args.parts:
        data["ray"] = part_ray(args.ray_sizes, args.window)
    (out / "control_plane.json").write_text(json.dumps(data, indent=1, default=str))
    plot(data, out / "control_plane.png")
    print(f"wrote {out}/control_plane.json and control_plane.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
