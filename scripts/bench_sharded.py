"""Sharded models (issue 13): elastic with FSDP2 vs plain FSDP2 and torchrun + DCP, on one job.

The job: demo_lm's byte-level transformer LM at ≥ 20 M parameters (--d-model 512 --layers 8:
25.5 M, 102 tensors), AdamW, context 32, global batch 8, one thread per rank, gloo, a durable DCP
checkpoint every C steps in every arm. Per world size (--ranks):

  fsdp          torchrun, plain FSDP2 (fully_shard per block, then the root), no failure,
                synchronous dcp.save every C steps: the steady-state baseline
  torchrun-dcp  the same under torchrun --max-restarts (fresh store per restart); rank 1 SIGKILLs
                itself at step K; torchrun restarts every rank, which dcp.load the newest checkpoint
  elastic       elastic, strategy="fsdp", no failure: steady state and host memory
  buddy         elastic, rank 1 SIGKILLed at step K: its rows come back from its buddy's host copy
                (no storage read), cold replacement actor
  buddy+spare   the same with one warm spare (spares=1)
  checkpoint    elastic, rank 1 and its buddy SIGKILLed together at step K: the rows exist only in
                the step-C·⌊K/C⌋ checkpoint: the durable-checkpoint path (resharded DCP load)

Recovery = kill → first step completed by the next group (rank 0's step log, bench_common);
lost = completed steps recomputed. Step time = median of steady-state steps (no group change, no
checkpoint step). Host memory per rank: peak RSS of each rank's process at the end, and for elastic
its snapshot + buddy buffers vs its shard (ctx.stats()); for the buddy arm the host memory the
restore held, as a multiple of the shard (the issue's bound: ≤ 3×).

Quick:  python scripts/bench_sharded.py --ranks 2 --reps 1
Full:   python scripts/bench_sharded.py --ranks 2 4 --reps 2     (≈ 25 min on 2 cores)
Writes bench_out/sharded.json and bench_out/sharded.png (--out-dir).
"""

from __future__ import annotations

import time

T_START = time.time()  # a torchrun worker's process start, before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_common as bc  # noqa: E402
import demo_lm as lm  # noqa: E402
from bench_recovery import breakdown  # noqa: E402

TARGETS = {"buddy_spare_s": 1.0, "buddy_s": 2.5, "vs_checkpoint": 3.0, "lost_steps": 1, "step_ratio": 1.10,
           "restore_host_x_shard": 3.0}
ARMS = ["fsdp", "torchrun-dcp", "elastic", "buddy", "buddy+spare", "checkpoint"]
MEM_LOG = "mem.log"


def model_config(args: Any) -> dict:
    return {"d_model": args["d_model"], "layers": args["layers"], "heads": 8, "context": 32, "seed": 0,
            "text_bytes": 1_000_000}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def _log_mem(run_dir: str, arm: str, gen: int, rank: int, **kv: float) -> None:
    with open(os.path.join(run_dir, MEM_LOG), "a") as f:
        f.write(json.dumps({"arm": arm, "gen": gen, "rank": rank, "peak_rss": _peak_rss(), **kv}) + "\n")


def _data(cfg: dict) -> tuple[lm.Windows, Any]:
    from elastic import ElasticSampler  # a pure function of (step, rank, world size): usable by every arm

    data, _ = lm.split(cfg["model"])
    return data, ElasticSampler(num_samples=data.n, global_batch_size=cfg["global_batch"], seed=0)


def _optimizer(model: Any) -> Any:
    import torch

    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


# -- plain FSDP2 under torchrun, DCP checkpoints -----------------------------------------------------
def torch_worker(cfg: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from elastic.chaos.faults import maybe_inject, parse_faults

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    mesh = init_device_mesh("cpu", (world,))
    t_setup = time.time()
    data, sampler = _data(cfg)
    model = lm.make_model(cfg["model"])
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _optimizer(model)
    root = Path(cfg["run_dir"], "dcp")
    latest = root / "latest"
    step = 0
    if latest.exists():  # committed by rank 0 after every rank's dcp.save returned
        step = int(latest.read_text())
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(root / f"step_{step}"))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    t_restored = time.time()
    bc.write_phase(cfg["run_dir"], gen, rank, T_START, t_setup, t_restored)
    faults, log = parse_faults(cfg["faults"]), bc.StepLog(cfg["run_dir"], rank == 0)
    while step < cfg["steps"]:
        maybe_inject(faults, step=step, rank=rank, marker_dir=cfg["marker_dir"])
        lm.lm_step(model, opt, data, sampler, step, rank, world)
        step += 1
        stall = 0.0
        if step % cfg["every"] == 0:  # synchronous: every rank writes its own shards, then rank 0 commits
            t0 = time.perf_counter()
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(root / f"step_{step}"))
            dist.barrier()
            if rank == 0:
                tmp = latest.with_suffix(".tmp")
                tmp.write_text(str(step))
                os.replace(tmp, latest)
            stall = time.perf_counter() - t0
        log.step(step, gen, 0.0, stall)
    log.close()
    _log_mem(cfg["run_dir"], cfg["arm"], gen, rank)
    dist.barrier()
    os._exit(0)  # destroying the gloo group at exit can hang a rank whose peer already left


# -- elastic ---------------------------------------------------------------------------------------
def elastic_worker(cfg: dict) -> None:
    import torch

    import elastic
    from elastic.chaos.faults import maybe_inject, parse_faults

    t_enter = time.time()
    torch.set_num_threads(1)
    ctx = elastic.get_context()
    data, sampler = _data(cfg)
    with ctx.skip_init_if_restoring():  # a recovery's restore overwrites the weights: don't draw them
        model = lm.make_model(cfg["model"])
    model = ctx.prepare_model(model, strategy="fsdp")
    opt = _optimizer(model)
    state = elastic.TrainState(model=model, optimizer=opt)
    t_setup = time.time()
    ctx.restore(state)
    bc.write_phase(cfg["run_dir"], ctx.generation, ctx.rank, t_enter, t_setup, time.time())
    st = ctx.stats()
    if ctx.generation > 0:
        _log_mem(cfg["run_dir"], cfg["arm"], ctx.generation, ctx.rank, restore_host_bytes=st["restore_host_bytes"],
                 shard_bytes=st["shard_bytes"], at="restore")
    faults, log = parse_faults(cfg["faults"]), bc.StepLog(cfg["run_dir"], ctx.rank == 0)
    try:
        while state.step < cfg["steps"]:
            maybe_inject(faults, step=state.step, rank=ctx.rank, marker_dir=cfg["marker_dir"])
            lm.lm_step(model, opt, data, sampler, state.step, ctx.rank, ctx.world_size)
            t0 = time.perf_counter()
            ctx.commit(state)
            due = state.step % cfg["every"] == 0
            dt = time.perf_counter() - t0
            log.step(state.step, ctx.generation, 0.0 if due else dt, dt if due else 0.0)
    finally:
        log.close()
    st = ctx.stats()
    _log_mem(cfg["run_dir"], cfg["arm"], ctx.generation, ctx.rank, snapshot_bytes=st["snapshot_bytes"],
             buddy_bytes=st["buddy_bytes"], shard_bytes=st["shard_bytes"], blocked_s=st["snapshot_blocked_s"], at="end")


def run_elastic(cfg: dict, world: int, spares: int) -> dict:
    import elastic

    t0 = time.time()
    r = elastic.ElasticTrainer(
        elastic_worker, train_loop_config=cfg, name="sharded",
        scaling=elastic.ScalingConfig(min_workers=world, max_workers=world, spares=spares),
        checkpoint=elastic.CheckpointConfig(uri=os.path.join(cfg["run_dir"], "ckpt"), every_n_steps=cfg["every"]),
        failure=elastic.FailureConfig(max_failures=3)).fit(quiet=True, raise_on_failure=False)
    sources = sorted({e.get("source") for e in r.events if e["event"] == "restored" and e.get("generation", 0) > 0})
    return {"ok": r.ok, "error": r.error, "total_s": time.time() - t0, "restored_from": sources, "events": r.events}


# -- driver ----------------------------------------------------------------------------------------
def one_run(arm: str, world: int, root: str, i: int, args: argparse.Namespace) -> dict:
    run_dir = tempfile.mkdtemp(prefix=f"{arm}_{world}_{i}_", dir=root)
    k = args.kill_step
    faults = {"torchrun-dcp": [1], "buddy": [1], "buddy+spare": [1], "checkpoint": [1, (1 + 1) % world]}.get(arm, [])
    # (1 + 1) % world: on one node rank r's buddy is rank r+1 (elastic._internal.worker.recovery.reshard.buddies).
    cfg = {"arm": arm, "steps": args.steps, "every": args.every, "run_dir": run_dir, "global_batch": 8,
           "marker_dir": os.path.join(run_dir, "markers"), "model": model_config(vars(args)),
           "faults": [{"kind": "sigkill", "step": k, "rank": r} for r in faults]}
    if arm in ("fsdp", "torchrun-dcp"):
        info = bc.run_torchrun(__file__, cfg, world=world, restarts=3 if faults else 0, fresh_store=True,
                               timeout=args.timeout)
    else:
        info = run_elastic(cfg, world, spares=1 if arm == "buddy+spare" else 0)
    a = bc.analyze_run(run_dir, cfg["marker_dir"])
    recs = [{**r.__dict__, **bc.phase_breakdown(run_dir, r)} for r in a.recoveries][:1]  # 2 kills: one recovery
    if recs and "events" in info:  # elastic: the supervisor's phases (detect, rebuild, transfer, first step)
        pid = {round(k[2], 6): k[1] for k in bc.read_kills(cfg["marker_dir"])}.get(round(recs[0]["kill_time"], 6), -1)
        recs[0]["phases"] = breakdown(info["events"], a.recoveries[0], pid)
    info.pop("events", None)
    mem = [json.loads(line) for line in Path(run_dir, MEM_LOG).read_text().splitlines()] \
        if Path(run_dir, MEM_LOG).exists() else []
    done = max((s for s, _, _ in a.steps), default=0)
    out = {"arm": arm, "world": world, "run": i, **info, "steps_done": done, "finished": done >= args.steps,
           "step_s": bc.med(a.step_times), "step_times": a.step_times, "ckpt_stalls": a.ckpt_stalls,
           "recoveries": recs, "steps": a.steps, "mem": mem}
    r = recs[0] if recs else None
    print(f"  {arm:13} w={world} run {i}: {done}/{args.steps} steps, total {info['total_s']:.1f}s, "
          f"step {out['step_s'] or 0:.3f}s" + (f", recovery {r['seconds']:.2f}s, lost {r['lost_steps']}" if r else "")
          + (f", restored from {info['restored_from']}" if info.get("restored_from") else "")
          + ("".join(f", {k} {v:.2f}" for k, v in r["phases"].items() if isinstance(v, float)) if r and "phases" in r else "")
          + ("" if info.get("ok", info.get("rc") == 0) else f" FAILED {info.get('error') or info.get('rc')}"),
          flush=True)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torchrun-worker", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--reps", type=int, default=2, help="runs per (arm, world size)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--kill-step", type=int, default=16, help="late enough for the node standby (started 10 s into the run's first group) to be warm")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on one torchrun job")
    ap.add_argument("--keep", action="store_true", help="keep run directories")
    ap.add_argument("--out-dir", default="bench_out")
    args = ap.parse_args()
    if args.torchrun_worker:
        torch_worker(json.loads(Path(args.torchrun_worker).read_text()))
        return
    params = sum(t.numel() for t in lm.make_model(model_config(vars(args))).parameters())
    print(f"model: {params / 1e6:.1f} M parameters, AdamW; ranks {args.ranks}; {args.reps} runs per cell", flush=True)
    import ray
    from ray import cloudpickle

    for module in (bc, lm):  # plain files, not installed: the workers get them by value
        cloudpickle.register_pickle_by_value(module)
    root = tempfile.mkdtemp(prefix="bench_sharded_")
    before = bc.machine_note()
    runs: list[dict] = []
    ray.init(num_cpus=max(args.ranks) + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        for world in args.ranks:
            for rep in range(args.reps):  # arms interleaved: a slow minute of the machine hits them all
                for arm in args.arms:
                    runs.append(one_run(arm, world, root, rep, args))
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(runs, args, before, params)


# -- report ----------------------------------------------------------------------------------------
def summarize(runs: list[dict]) -> dict[str, Any]:
    recs = [r["recoveries"][0] for r in runs if r["recoveries"]]
    pooled = [t for r in runs for t in r["step_times"]]
    end = [m for r in runs for m in r["mem"] if m.get("at") != "restore"]
    restore = [m for r in runs for m in r["mem"] if m.get("at") == "restore" and m.get("shard_bytes")]
    return {"runs": len(runs), "finished": sum(r["finished"] for r in runs), "step_s": bc.med(pooled),
            "recovery_s": [x["seconds"] for x in recs], "lost": [x["lost_steps"] for x in recs],
            "restart_s": [x["restart"] for x in recs if x["restart"] is not None],
            "restore_s": [x["restore"] for x in recs if x["restore"] is not None],
            "stall_s": [s for r in runs for s in r["ckpt_stalls"]],
            "peak_rss_mb": [m["peak_rss"] / 2**20 for m in end],
            "copies_x_shard": [(m["snapshot_bytes"] + m["buddy_bytes"]) / m["shard_bytes"] for m in end
                               if m.get("shard_bytes")],
            "shard_mb": [m["shard_bytes"] / 2**20 for m in end if m.get("shard_bytes")],
            "restore_x_shard": [m["restore_host_bytes"] / m["shard_bytes"] for m in restore],
            "restored_from": sorted({s for r in runs for s in r.get("restored_from", [])})}


def report(runs: list[dict], args: argparse.Namespace, before: dict, params: int) -> None:
    S = {(w, a): summarize([r for r in runs if r["world"] == w and r["arm"] == a]) for w in args.ranks for a in args.arms}
    print(f"\n{params / 1e6:.1f} M-parameter LM under FSDP2, C={args.every}, kill at step {args.kill_step}; "
          "median (min–max) over runs; seconds, MiB")
    rows = []
    for (w, a), s in S.items():
        base = S.get((w, "fsdp"), {}).get("step_s")
        rows.append([w, a, f"{s['finished']}/{s['runs']}", f"{s['step_s']:.3f}" if s["step_s"] else "—",
                     f"{s['step_s'] / base:.2f}×" if s["step_s"] and base else "—",
                     bc.spread(s["recovery_s"], "{:.2f}"), bc.spread(s["restart_s"], "{:.2f}"),
                     bc.spread(s["restore_s"], "{:.2f}"), bc.spread(s["lost"], "{:.0f}"),
                     ",".join(s["restored_from"]) or "—", bc.spread(s["stall_s"], "{:.2f}"),
                     bc.spread(s["peak_rss_mb"], "{:.0f}"), bc.spread(s["shard_mb"], "{:.0f}"),
                     bc.spread(s["copies_x_shard"], "{:.2f}"),
                     f"{max(s['restore_x_shard']):.2f}" if s["restore_x_shard"] else "—"])
    bc.print_table(["ranks", "arm", "finished", "step s", "÷ FSDP2", "recovery", "restart", "restore", "lost",
                    "restored from", "ckpt stall", "peak RSS/rank", "shard", "copies ÷ shard",
                    "restore mem ÷ shard (max)"], rows)
    print("  restart = kill → every rank of the new group is in the training code; restore = → state loaded;"
          " copies = snapshot + buddy buffers at the end")
    verdicts = targets(S, args)
    print("\nTargets (from this run):")
    for v in verdicts:
        print(f"  {bc.check(v['ok'])} {v['what']}: {v['got']}")
    out = Path(args.out_dir)
    bc.write_json(out / "sharded.json", {"machine_before": before, "machine_after": bc.machine_note(),
                                         "params": params, "args": vars(args), "targets": verdicts,
                                         "summary": {f"{w}/{a}": s for (w, a), s in S.items()}, "runs": runs})
    plotted = plot(runs, out / "sharded.png")
    print(f"\nwrote {out / 'sharded.json'}" + (f" and {out / 'sharded.png'}" if plotted else "")
          + f"; load average before/after: {before['loadavg_1_5_15']} / {bc.machine_note()['loadavg_1_5_15']}")


def targets(S: dict, args: argparse.Namespace) -> list[dict]:
    m = lambda w, a, k: bc.med(S[(w, a)][k]) if (w, a) in S and S[(w, a)][k] else None  # noqa: E731
    out = []
    for w in args.ranks:
        for arm, key in (("buddy+spare", "buddy_spare_s"), ("buddy", "buddy_s")):
            r = m(w, arm, "recovery_s")
            out.append({"what": f"{w} ranks: {arm} recovery ≤ {TARGETS[key]:g} s", "got": "—" if r is None else f"{r:.2f} s",
                        "ok": None if r is None else r <= TARGETS[key]})
        b, c, t = m(w, "buddy", "recovery_s"), m(w, "checkpoint", "recovery_s"), m(w, "torchrun-dcp", "recovery_s")
        out.append({"what": f"{w} ranks: buddy path ≥ {TARGETS['vs_checkpoint']:g}× faster than the checkpoint path",
                    "ok": None if not (b and c) else c / b >= TARGETS["vs_checkpoint"],
                    "got": "—" if not (b and c) else f"{c / b:.1f}× ({b:.2f} s vs {c:.2f} s; torchrun + DCP "
                                                     f"{'—' if t is None else f'{t:.2f} s'})"})
        lost = [x for a in ("buddy", "buddy+spare") if (w, a) in S for x in S[(w, a)]["lost"]]
        out.append({"what": f"{w} ranks: buddy path lost work ≤ 1 step", "ok": None if not lost else max(lost) <= 1,
                    "got": f"max {max(lost) if lost else '—'}"})
        e, f = S.get((w, "elastic"), {}).get("step_s"), S.get((w, "fsdp"), {}).get("step_s")
        out.append({"what": f"{w} ranks: steady state ≤ {TARGETS['step_ratio']:.2f}× plain FSDP2",
                    "ok": None if not (e and f) else e / f <= TARGETS["step_ratio"],
                    "got": "—" if not (e and f) else f"{e / f:.2f}× ({e:.3f} s vs {f:.3f} s)"})
        x = max(S[(w, "buddy")]["restore_x_shard"], default=None) if (w, "buddy") in S else None
        out.append({"what": f"{w} ranks: host memory during a buddy restore ≤ {TARGETS['restore_host_x_shard']:g}× the shard",
                    # + 1e-3: the snapshot also holds the replicated per-parameter step counters (~1e-5)
                    "ok": None if x is None else x <= TARGETS["restore_host_x_shard"] + 1e-3,
                    "got": "—" if x is None else f"{x:.2f}×"})
    return out


def plot(runs: list[dict], path: Path) -> bool:
    panels = [(f"{w} ranks; × = SIGKILL", [r for r in runs if r["world"] == w]) for w in sorted({r["world"] for r in runs})]
    return bc.plot_step_panels(panels, path, origin=lambda r: r["steps"][0][1], xlabel="seconds since the first step")


if __name__ == "__main__":
    main()
