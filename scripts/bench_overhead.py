"""Steady-state cost of elastic against plain DDP, in one run: step time by model size and rank count.

    python scripts/bench_overhead.py --ranks 2 3 4 --sizes small medium large --reps 3 --out bench_out/overhead

Arms, the same job in each (AdamW, global batch 32, one thread per rank, gloo, synthetic data):
- ddp:     torch's DistributedDataParallel with default settings, in spawned processes.
- elastic: ElasticTrainer with default settings (ExactDDP, a live snapshot every step, a standby
           per node, checkpoints every 100 steps: a few in the small model's window, which the
           median does not see).
Models: small (5 Linear+LayerNorm blocks, ~0.3 M params, 21 tensors), medium (16 blocks of width
1024, ~17 M, 66 tensors), large (a 16-layer transformer encoder, d_model 512: 50.4 M, 194 tensors;
--seq tokens per sample, 16 by default: 4 keeps a large step near 1-2 s on 2 cores).

Per cell (arm x size x ranks): the median step time over steps 10..STEPS[size] (400 small, 60
medium, 40 large) of each repetition, then the median and spread (min-max) over repetitions;
elastic's cells also report the training thread's time blocked by the snapshot per step, the
background copy's own time per step, and the snapshot's host memory. Arms alternate within each repetition so that the machine's drift hits both. Prints a
table, writes JSON and a PNG (step time vs model size, one line per arm and rank count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

GLOBAL_BATCH = 32
SEQ = int(os.environ.get("BENCH_OVERHEAD_SEQ", "16"))
"""Tokens per sample of the large model (--seq; through the environment, so that the spawned DDP
ranks and the Ray workers see the same value)."""
WARMUP = 10
STEPS = {"small": 400, "medium": 60, "large": 40}
"""Steps per run by size: the window after WARMUP lasts several seconds at every size (50 small
steps were half a second, which this machine's noise swamped)."""


def make_model(size: str) -> nn.Module:
    torch.manual_seed(0)
    if size == "small":
        return nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(240, 240), nn.LayerNorm(240))], nn.Linear(240, 8))
    if size == "medium":
        return nn.Sequential(*[m for _ in range(16) for m in (nn.Linear(1024, 1024), nn.LayerNorm(1024))],
                             nn.Linear(1024, 8))
    layer = nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, num_layers=16, enable_nested_tensor=False), nn.Linear(512, 8))


def in_dim(size: str) -> int:
    return {"small": 240, "medium": 1024, "large": 512}[size]


def batch(size: str, step: int, rank: int, world: int) -> torch.Tensor:
    n = GLOBAL_BATCH * (rank + 1) // world - GLOBAL_BATCH * rank // world
    g = torch.Generator().manual_seed(1000 * step + rank)
    shape = (n, SEQ, in_dim(size)) if size == "large" else (n, in_dim(size))
    return torch.randn(*shape, generator=g)


def one_step(model: nn.Module, opt: torch.optim.Optimizer, size: str, step: int, rank: int, world: int) -> None:
    opt.zero_grad()
    model(batch(size, step, rank, world)).square().mean().backward()
    opt.step()


# -- the plain DDP arm ----------------------------------------------------------------------------
def _ddp_rank(rank: int, world: int, port: int, size: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    model = make_model(size)
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(STEPS[size]):
        t0 = time.perf_counter()
        one_step(ddp, opt, size, step, rank, world)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "input": list(batch(size, 0, 0, world).shape)}))
    dist.destroy_process_group()


def run_ddp(size: str, world: int, tmp: str) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tmp, f"ddp-{size}-{world}-{time.time_ns()}.json")
    mp.start_processes(_ddp_rank, args=(world, port, size, out), nprocs=world, join=True, start_method="spawn")
    doc = json.loads(Path(out).read_text())
    return {"step_s": statistics.median(doc["times"][WARMUP:]), "input": doc["input"]}


# -- the elastic arm -------------------------------------------------------------------------------
def elastic_train(config: dict) -> None:
    import elastic

    torch.set_num_threads(1)
    ctx = elastic.get_context()
    size = config["size"]
    model = make_model(size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = elastic.TrainState(model=model, optimizer=opt)
    ctx.restore(state)
    ddp = ctx.prepare_model(model)
    times, stats0 = [], None
    while state.step < STEPS[size]:
        t0 = time.perf_counter()
        one_step(ddp, opt, size, state.step, ctx.rank, ctx.world_size)
        ctx.commit(state)
        times.append(time.perf_counter() - t0)
        if state.step == WARMUP:
            stats0 = ctx.stats()
    if ctx.rank == 0:
        s1 = ctx.stats()
        n = STEPS[size] - WARMUP
        Path(config["out"]).write_text(json.dumps({
            "times": times, "blocked_per_step_s": (s1["snapshot_blocked_s"] - stats0["snapshot_blocked_s"]) / n,
            "copy_per_step_s": (s1["snapshot_copy_s"] - stats0["snapshot_copy_s"]) / n,
            "snapshot_bytes": s1["snapshot_bytes"], "input": list(batch(size, 0, 0, ctx.world_size).shape)}))


def run_elastic(size: str, world: int, tmp: str) -> dict[str, Any]:
    import elastic

    out = os.path.join(tmp, f"elastic-{size}-{world}-{time.time_ns()}.json")
    r = elastic.ElasticTrainer(elastic_train, train_loop_config={"size": size, "out": out},
                               scaling=elastic.ScalingConfig(min_workers=world),
                               checkpoint=elastic.CheckpointConfig(uri=os.path.join(tmp, f"run-{time.time_ns()}")),
                               ).fit(quiet=True)
    assert r.ok, r.error
    doc = json.loads(Path(out).read_text())
    return {"step_s": statistics.median(doc["times"][WARMUP:]), "blocked_per_step_s": doc["blocked_per_step_s"],
            "copy_per_step_s": doc["copy_per_step_s"], "snapshot_bytes": doc["snapshot_bytes"], "input": doc["input"]}


def describe(size: str) -> tuple[float, int, int]:
    m = make_model(size)
    params = list(m.parameters())
    n = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params)
    return n / 1e6, len(params), n * 4 * 3  # params, optimizer state: 3x the parameters' bytes (AdamW)


def main() -> None:
    global SEQ
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--sizes", nargs="+", default=["small", "medium", "large"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="bench_out/overhead")
    p.add_argument("--seq", type=int, default=SEQ, help="tokens per sample of the large model (compute per step)")
    p.add_argument("--report", action="store_true",
                   help="only print the table and plot of OUT/overhead.json (e.g. of a run cut short)")
    args = p.parse_args()
    if args.report:
        report(json.loads(Path(args.out, "overhead.json").read_text())["cells"], Path(args.out))
        return
    import ray

    # Both arms must see --seq: the spawned DDP ranks import this module again (the environment
    # reaches them), and Ray pickles elastic_train by value from __main__, SEQ included (this global:
    # left at its import-time default, the elastic arm ran 4x the tokens of the DDP arm).
    SEQ = args.seq
    os.environ["BENCH_OVERHEAD_SEQ"] = str(args.seq)
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench-overhead-")
    ray.init(address="local", num_cpus=max(args.ranks) + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "BENCH_OVERHEAD_SEQ": str(args.seq)}})
    cells: dict[str, Any] = {}
    for size in args.sizes:
        mparams, ntensors, state_bytes = describe(size)
        for world in args.ranks:
            reps: dict[str, list[dict]] = {"ddp": [], "elastic": []}
            for rep in range(args.reps):
                order = ["ddp", "elastic"] if rep % 2 == 0 else ["elastic", "ddp"]
                for arm in order:
                    res = run_ddp(size, world, tmp) if arm == "ddp" else run_elastic(size, world, tmp)
                    reps[arm].append(res)
                    # The same job in both arms, or the ratio means nothing.
                    assert all(r["input"] == res["input"] for rs in reps.values() for r in rs), reps
                    print(f"  {size} x{world} rep {rep} {arm}: {res['step_s'] * 1e3:.1f} ms", flush=True)
            cell = {"size": size, "params_m": round(mparams, 2), "tensors": ntensors, "ranks": world,
                    "state_bytes": state_bytes, "seq": args.seq if size == "large" else None}
            for arm, rs in reps.items():
                steps = [r["step_s"] for r in rs]
                cell[arm] = {"step_s": statistics.median(steps), "min": min(steps), "max": max(steps), "reps": steps}
            el = reps["elastic"]
            cell["elastic"].update({
                "blocked_per_step_s": statistics.median(r["blocked_per_step_s"] for r in el),
                "copy_per_step_s": statistics.median(r["copy_per_step_s"] for r in el),
                "snapshot_bytes": max(r["snapshot_bytes"] for r in el)})
            cell["ratio"] = cell["elastic"]["step_s"] / cell["ddp"]["step_s"]
            cells[f"{size}-{world}"] = cell
            Path(args.out, "overhead.json").write_text(json.dumps({"machine": bc.machine_note(), "cells": cells},
                                                                  indent=1))
    ray.shutdown()
    report(cells, Path(args.out))


def report(cells: dict[str, Any], out: Path) -> None:
    rows = []
    for c in cells.values():
        e, d = c["elastic"], c["ddp"]
        target = 1.05 if c["ranks"] <= 2 else 1.10
        blocked_share = e["blocked_per_step_s"] / e["copy_per_step_s"] if e["copy_per_step_s"] else float("nan")
        rows.append([f"{c['size']} ({c['params_m']} M, {c['tensors']} t)", str(c["ranks"]),
                     f"{d['step_s'] * 1e3:.1f} ({d['min'] * 1e3:.1f}-{d['max'] * 1e3:.1f})",
                     f"{e['step_s'] * 1e3:.1f} ({e['min'] * 1e3:.1f}-{e['max'] * 1e3:.1f})",
                     f"{c['ratio']:.3f} {'ok' if c['ratio'] <= target else 'MISS'} (<= {target})",
                     f"{e['blocked_per_step_s'] * 1e3:.2f} / {e['copy_per_step_s'] * 1e3:.2f} ms ({blocked_share:.0%})",
                     f"{e['snapshot_bytes'] / 2**20:.0f} MB ({e['snapshot_bytes'] / c['state_bytes']:.2f}x)"])
    bc.print_table(["model", "ranks", "DDP step ms (spread)", "elastic step ms (spread)", "ratio",
                    "snapshot blocked / copy per step", "snapshot memory (x state)"], rows)
    plot(cells, out / "overhead.png")


def plot(cells: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for world in sorted({c["ranks"] for c in cells.values()}):
        cs = sorted((c for c in cells.values() if c["ranks"] == world), key=lambda c: c["params_m"])
        xs = [c["params_m"] for c in cs]
        ax.plot(xs, [c["ddp"]["step_s"] * 1e3 for c in cs], "o--", label=f"DDP, {world} ranks")
        ax.plot(xs, [c["elastic"]["step_s"] * 1e3 for c in cs], "s-", label=f"elastic, {world} ranks")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model parameters (M)")
    ax.set_ylabel("median step time (ms)")
    ax.set_title("steady-state step time: elastic vs plain DDP (2 cores, gloo)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
