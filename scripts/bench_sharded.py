"""Sharded models (issue 13): elastic with FSDP2 vs plain FSDP2 and torchrun + DCP, on one job.

The job: demo_lm's byte-level transformer LM at ≥ 20 M parameters (--d-model 512 --layers 8:
25.5 M, 102 tensors), AdamW, context 32, global batch 8, one thread per rank, gloo, a durable DCP
checkpoint every C steps in every arm. Per world size (--ranks):

  fsdp          torchrun, plain FSDP2 (fully_shard per block, then the root), no failure,
                synchronous dcp.save every C steps: the steady-state baseline
  torchrun-dcp  the same under torchrun --max-restarts (fresh store per restart); rank 1 SIGKILLs
                itself at step K; torchrun restarts every rank, which dcp.load the newest checkpoint
  elastic       elastic, strategy="fsdp", no failure: steady state and host memory
  overlap       the same with FailureConfig(buddy_overlap=True) (the exchange behind the next step)
  loopback      the same with FailureConfig(buddy_shm=False) (ranks on one node send their buddy
                copies over loopback TCP instead of mapping them from shared memory)
  buddy         elastic, rank 1 SIGKILLed at step K: its rows come back from its buddy's host copy
                (no storage read), cold replacement actor
  buddy+spare   the same with one warm spare (spares=1)
  checkpoint    elastic, rank 1 and its buddy SIGKILLed together at step K: the rows exist only in
                the step-C·⌊K/C⌋ checkpoint: the durable-checkpoint path (resharded DCP load)
  hsdp          elastic, strategy="hsdp" on a fresh two-node ray.cluster_utils.Cluster (sharded_ray:
                world/2 ranks per node, so the mesh is 2 nodes × world/2 shards), rank 1 SIGKILLed at
                step K: its rows come back from its live replica on the other node (restore source
                "replica": no buddy copy, no storage read); its node's standby replaces it

Recovery = kill → first step completed by the next group (rank 0's step log, bench_common);
lost = completed steps recomputed. Step time = median of steady-state steps (no group change, no
checkpoint step). Host memory per rank: peak RSS of each rank's process at the end, and for elastic
its snapshot + buddy buffers vs its shard (ctx.stats()); for the buddy arm the host memory the
restore held, as a multiple of the shard (the issue's bound: ≤ 3×).

--schedule (opt-in; sharded_schedule): instead of the one-kill arms, --schedule-arms (elastic, hsdp,
torchrun-dcp; default elastic and hsdp) each run --schedule-steps steps failure-free and then under
bench_churn's seeded failure schedule (SIGKILL of a random live rank at exponential gaps of mean --gap
s, the same kill times for every arm; one run per --seeds): ETTR, per-failure cost median / max,
steps lost, checkpoint fallbacks, where each recovery's lost rows came from.

Quick:  python scripts/bench_sharded.py --ranks 2 --reps 1
Full:   python scripts/bench_sharded.py --ranks 2 4 --reps 3     (issue 26: ≥ 3 runs per cell)
HSDP:   python scripts/bench_sharded.py --ranks 2 4 --reps 3 --arms elastic hsdp
Churn:  python scripts/bench_sharded.py --schedule --ranks 4 --gap 30 --seeds 0 1
Smoke:  add --d-model 128 --layers 2 --steps 24 (--schedule-steps 60 --gap 8)
Writes sharded.json, sharded.txt, sharded.png (--schedule: sharded_schedule.json/.txt/.png) under
--out-dir (default bench_out).
"""

from __future__ import annotations

import time

T_START = time.time()  # a torchrun worker's process start, before torch is imported

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_common as bc  # noqa: E402
import demo_lm as lm  # noqa: E402
from bench_recovery import breakdown  # noqa: E402
from sharded_ray import RaySession  # noqa: E402
from sharded_report import report  # noqa: E402

ARMS = ["fsdp", "torchrun-dcp", "elastic", "overlap", "loopback", "buddy", "buddy+spare", "checkpoint", "hsdp"]
"""overlap: elastic with FailureConfig(buddy_overlap=True), no failure (its steady state and memory);
loopback: elastic with FailureConfig(buddy_shm=False): every buddy copy over loopback TCP, no failure."""
SCHEDULE_ARMS = ["elastic", "hsdp", "torchrun-dcp"]
TORCHRUN_ARMS = ("fsdp", "torchrun-dcp")
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
    bc.register_pid(cfg["run_dir"], rank, gen)  # a failure schedule's victims (sharded_schedule)
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
    bc.write_phase(cfg["run_dir"], gen, rank, T_START, t_setup, time.time())
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
    bc.register_pid(cfg["run_dir"], ctx.rank, ctx.generation)  # a failure schedule's victims (sharded_schedule)
    data, sampler = _data(cfg)
    with ctx.skip_init_if_restoring():  # a recovery's restore overwrites the weights: don't draw them
        model = lm.make_model(cfg["model"])
    model = ctx.prepare_model(model, strategy=cfg["strategy"])
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


def run_elastic(cfg: dict, world: int, spares: int, max_failures: int = 3) -> dict:
    import elastic

    t0 = time.time()
    r = elastic.ElasticTrainer(
        elastic_worker, train_loop_config=cfg, name="sharded",
        scaling=elastic.ScalingConfig(min_workers=world, max_workers=world, spares=spares),
        checkpoint=elastic.CheckpointConfig(uri=os.path.join(cfg["run_dir"], "ckpt"), every_n_steps=cfg["every"]),
        failure=elastic.FailureConfig(max_failures=max_failures, buddy_overlap=cfg["arm"] == "overlap",
                                      buddy_shm=cfg["arm"] != "loopback"),
    ).fit(quiet=True, raise_on_failure=False)
    later = [e for e in r.events if e["event"] == "restored" and e.get("generation", 0) > 0]
    sources = sorted({e.get("source") for e in later})
    # Of the restores after a failure: how many survivors trained on the model they kept, and how
    # many newcomers had rehearsed the optimizer step as standbys (kept_model.py, rehearsal.py).
    warm = {"kept": sum(bool(e.get("model_kept")) for e in later), "restores": len(later),
            "rehearsed": sum(bool(e.get("rehearsed")) for e in later)}
    return {"ok": r.ok, "error": r.error, "total_s": time.time() - t0, "restored_from": sources, "events": r.events,
            **warm}


def job_config(arm: str, world: int, run_dir: str, args: argparse.Namespace, steps: int, kills: list[int]) -> dict:
    """One run's train_loop_config (torchrun: its cfg.json); `kills`: ranks that SIGKILL themselves at
    --kill-step."""
    return {"arm": arm, "steps": steps, "every": args.every, "run_dir": run_dir, "global_batch": 8,
            "strategy": "hsdp" if arm.startswith("hsdp") else "fsdp",
            "marker_dir": os.path.join(run_dir, "markers"), "model": model_config(vars(args)),
            "faults": [{"kind": "sigkill", "step": args.kill_step, "rank": r} for r in kills]}


def launch(arm: str, cfg: dict, world: int, args: argparse.Namespace, session: RaySession, *,
           restarts: int, max_failures: int) -> dict:
    """Run one job of `arm` to its end: torchrun (up to `restarts` restarts), or elastic on the Ray the
    arm needs (hsdp: a fresh two-node Cluster; the others: the local instance)."""
    if arm in TORCHRUN_ARMS:
        return bc.run_torchrun(__file__, cfg, world=world, restarts=restarts, fresh_store=True, timeout=args.timeout)
    if arm.startswith("hsdp"):
        session.two_nodes(world)
    else:
        session.local()
    # A run past --timeout is interrupted (SIGINT: KeyboardInterrupt in fit) and its Ray torn down, so
    # that no stuck actor of it outlives the run; the benchmark goes on with the next run.
    watchdog = threading.Timer(args.timeout, os.kill, args=(os.getpid(), signal.SIGINT))
    watchdog.start()
    t0 = time.time()
    try:
        return run_elastic(cfg, world, spares=1 if arm.endswith("+spare") else 0, max_failures=max_failures)
    except KeyboardInterrupt:
        session.close()
        return {"ok": False, "error": f"timed out after {args.timeout:.0f} s", "total_s": time.time() - t0}
    finally:
        watchdog.cancel()


# -- driver ----------------------------------------------------------------------------------------
def one_run(arm: str, world: int, root: str, i: int, args: argparse.Namespace, session: RaySession) -> dict:
    run_dir = tempfile.mkdtemp(prefix=f"{arm}_{world}_{i}_", dir=root)
    faults = {"torchrun-dcp": [1], "buddy": [1], "buddy+spare": [1], "checkpoint": [1, (1 + 1) % world],
              "hsdp": [1]}.get(arm, [])
    # (1 + 1) % world: on one node rank r's buddy is rank r+1 (elastic._internal.worker.recovery.reshard.buddies).
    # hsdp: rank 1 has a live replica on the other node whichever node it is on.
    cfg = job_config(arm, world, run_dir, args, args.steps, faults)
    info = launch(arm, cfg, world, args, session, restarts=3 if faults else 0, max_failures=3)
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
          + (f", kept {info['kept']}/{info['restores']}, rehearsed {info['rehearsed']}" if info.get("restores") else "")
          + ("".join(f", {k} {v:.2f}" for k, v in r["phases"].items() if isinstance(v, float)) if r and "phases" in r else "")
          + ("" if info.get("ok", info.get("rc") == 0) else f" FAILED {info.get('error') or info.get('rc')}"),
          flush=True)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def main() -> None:
    args = parse_args()
    if args.torchrun_worker:
        torch_worker(json.loads(Path(args.torchrun_worker).read_text()))
        return
    params = sum(t.numel() for t in lm.make_model(model_config(vars(args))).parameters())
    print(f"model: {params / 1e6:.1f} M parameters, AdamW; ranks {args.ranks}; "
          + (f"failure schedule, arms {args.schedule_arms}" if args.schedule else f"{args.reps} runs per cell"),
          flush=True)
    from ray import cloudpickle

    for module in (bc, lm):  # plain files, not installed: the workers get them by value
        cloudpickle.register_pickle_by_value(module)
    root = tempfile.mkdtemp(prefix="bench_sharded_")
    before = bc.machine_note()
    runs: list[dict] = []
    session = RaySession(local_cpus=max(args.ranks) + 1)
    try:
        if args.schedule:
            import sharded_schedule

            runs = sharded_schedule.run(args, root, functools.partial(schedule_launch, args=args, session=session))
        else:
            for world in args.ranks:
                for rep in range(args.reps):  # arms interleaved: a slow minute of the machine hits them all
                    for arm in args.arms:
                        runs.append(one_run(arm, world, root, rep, args, session))
    finally:
        session.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.schedule:
        sharded_schedule.write(runs, args, params, before)
    else:
        report(runs, args, before, params)


def schedule_launch(arm: str, world: int, run_dir: str, faulted: bool, *, args: argparse.Namespace,
                    session: RaySession) -> dict:
    """One --schedule run (sharded_schedule.Launch): no self-inflicted kill, restarts unbounded."""
    cfg = job_config(arm, world, run_dir, args, args.schedule_steps, [])
    return launch(arm, cfg, world, args, session, restarts=1000 if faulted else 0, max_failures=-1)


def parse_args() -> argparse.Namespace:
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
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on one job (torchrun or elastic)")
    ap.add_argument("--keep", action="store_true", help="keep run directories")
    ap.add_argument("--out-dir", default="bench_out")
    g = ap.add_argument_group("failure schedule (--schedule: instead of the one-kill arms)")
    g.add_argument("--schedule", action="store_true", help="run the schedule arms under a seeded failure schedule")
    g.add_argument("--schedule-arms", nargs="+", default=["elastic", "hsdp"], choices=SCHEDULE_ARMS)
    g.add_argument("--schedule-steps", type=int, default=200, help="steps per schedule run")
    g.add_argument("--gap", type=float, default=30.0, help="mean seconds between failures")
    g.add_argument("--seeds", type=int, nargs="+", default=[0])
    return ap.parse_args()


if __name__ == "__main__":
    main()
