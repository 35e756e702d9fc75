"""elastic vs its peers on one identical job (issue 6): DDP, torchrun, Ray Train, elastic.

Arms (2 ranks, bench_common's job, global batch 64, checkpoint every C=20 steps, one thread per rank):
  ddp               torchrun, no failures, synchronous torch.save every C steps (the baseline)
  torchrun          torchrun --max-restarts with a fresh store per restart (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
  torchrun-default  the same with torchrun's default shared store (bounded by --timeout; a stall is reported)
  raytrain          Ray Train TorchTrainer + FailureConfig, checkpoints through ray.train.report
  elastic           elastic, no spare;  elastic+spare: elastic with spares=1
  torchft           TorchFT 0.2 (peers_torchft.py): a lighthouse, one replica group per rank, each under
                    torchrun --max-restarts; the restarted group heals from the live one. Its
                    failure-free run (one, first) gives its steady-state step time.
  raytrain-torchft  the same TorchFT loop under Ray Train v2's TorchftConfig: Ray Train runs the
                    lighthouse and one worker per replica group, and restarts only the failed group.
Every fault-tolerant arm runs --kills separate runs; in each, rank 1 SIGKILLs itself at the top of
step --kill-step (elastic.chaos.faults; marker = pid + kill time). Rank 0 of every arm logs a
timestamp per completed step (bench_common.StepLog), from which recovery (kill → first step of the
next group), lost steps, steady-state step time and checkpoint stalls are derived the same way.

Quick:  python scripts/bench_peers.py --kills 1
Full:   python scripts/bench_peers.py --kills 5        (≈ 10 min on 2 cores)
Writes bench_out/peers.json and bench_out/peers.png (--out-dir).
"""

from __future__ import annotations

import time

T_START = time.time()  # a torchrun worker's process start, before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

WORLD = 2


# -- the torchrun / DDP worker ---------------------------------------------------------------------
def torch_worker(cfg: dict) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    bc.register_pid(cfg["run_dir"], rank, gen)
    t_setup = time.time()
    x, y = bc.make_data()
    model = bc.make_model(cfg.get("hidden", bc.HIDDEN))
    opt = bc.make_optimizer(model)
    path = os.path.join(cfg["run_dir"], "ckpt.pt")
    step = _restore(path, model, opt) if os.path.exists(path) else 0
    t_restored = time.time()
    ddp = DDP(model)
    _phase(cfg, gen, rank, T_START, t_setup, t_restored)

    def save(step: int) -> float:  # synchronous torch.save on rank 0: the loop waits for it
        if rank != 0:
            return 0.0
        t0 = time.perf_counter()
        with open(path + ".tmp", "wb") as f:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        return time.perf_counter() - t0

    _loop(cfg, ddp, opt, x, y, rank, world, gen, step, save)
    dist.barrier()
    os._exit(0)  # destroying the gloo group at exit can hang a rank whose peer already left


def _restore(path: str, model: Any, opt: Any) -> int:
    import torch

    sd = torch.load(path)
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optim"])
    return int(sd["step"])


def _loop(cfg: dict, ddp: Any, opt: Any, x: Any, y: Any, rank: int, world: int, gen: int, step: int,
          save: Any) -> None:
    """The peers' common training loop; `save(step) -> stall seconds` runs every cfg["every"] steps."""
    from elastic.chaos.faults import maybe_inject, parse_faults

    sampler, faults, log = bc.make_sampler(), parse_faults(cfg["faults"]), bc.StepLog(cfg["run_dir"], rank == 0)
    while step < cfg["steps"]:
        maybe_inject(faults, step=step, rank=rank, marker_dir=cfg["marker_dir"])
        bc.train_step(ddp, opt, x, y, sampler, step, rank, world)
        step += 1
        stall = save(step) if step % cfg["every"] == 0 else 0.0
        log.step(step, gen, 0.0, stall)
    log.close()


def _phase(cfg: dict, gen: int, rank: int, entered: float, setup: float, restored: float) -> None:
    bc.write_phase(cfg["run_dir"], gen, rank, entered, setup, restored)


def run_torchrun(cfg: dict, *, restarts: int, fresh_store: bool, timeout: float) -> dict:
    return bc.run_torchrun(__file__, cfg, world=WORLD, restarts=restarts, fresh_store=fresh_store, timeout=timeout)


# -- the Ray Train worker --------------------------------------------------------------------------
def ray_train_loop(cfg: dict) -> None:
    import torch
    import ray.train
    from ray.train import Checkpoint
    from torch.nn.parallel import DistributedDataParallel as DDP

    t_enter = time.time()
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    attempts = sorted(Path(cfg["run_dir"]).glob("attempt-*"))  # Ray Train has no attempt number: count them
    gen = len(attempts) if rank == 0 else 0
    if rank == 0:
        Path(cfg["run_dir"], f"attempt-{gen:03d}").touch()
    x, y = bc.make_data()
    model = bc.make_model()
    opt = bc.make_optimizer(model)
    t_setup = time.time()
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            step = _restore(os.path.join(d, "state.pt"), model, opt)
    t_restored = time.time()
    ddp = DDP(model)
    _phase(cfg, gen, rank, t_enter, t_setup, t_restored)

    def save(step: int) -> float:  # every rank reports; rank 0 attaches the checkpoint
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step},
                           os.path.join(d, "state.pt"))
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
        return time.perf_counter() - t0

    _loop(cfg, ddp, opt, x, y, rank, world, gen, step, save)

def run_raytrain(cfg: dict) -> dict:
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(bc)
    t0 = time.time()
    trainer = TorchTrainer(
        ray_train_loop, train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=WORLD, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"rt-{uuid.uuid4().hex[:6]}", storage_path=os.path.join(cfg["run_dir"], "rt"),
                                       failure_config=ray.train.FailureConfig(max_failures=cfg["restarts"])))
    try:
        trainer.fit()
        ok, err = True, None
    except Exception as exc:  # noqa: BLE001 - a failed peer is a row in the table, not a crash
        ok, err = False, f"{type(exc).__name__}: {str(exc)[:200]}"
    return {"ok": ok, "error": err, "total_s": time.time() - t0}


def run_elastic(cfg: dict, spares: int) -> dict:
    import elastic

    t0 = time.time()
    r = elastic.ElasticTrainer(
        bc.elastic_train, train_loop_config=cfg, name="peers",
        scaling=elastic.ScalingConfig(min_workers=WORLD, max_workers=WORLD, spares=spares),
        checkpoint=elastic.CheckpointConfig(uri=os.path.join(cfg["run_dir"], "ckpt"), every_n_steps=cfg["every"]),
        failure=elastic.FailureConfig(max_failures=cfg["restarts"])).fit(quiet=True, raise_on_failure=False)
    return {"ok": r.ok, "error": r.error, "total_s": time.time() - t0,
            "recovered": [e for e in r.events if e["event"] == "recovered"]}


# -- driver ----------------------------------------------------------------------------------------
def one_run(arm: str, root: str, i: int, args: argparse.Namespace, kill: bool, steps: int | None = None) -> dict:
    run_dir = tempfile.mkdtemp(prefix=f"{arm}_{i}_", dir=root)
    cfg = {"steps": steps or args.steps, "every": args.every, "run_dir": run_dir,
           "marker_dir": os.path.join(run_dir, "markers"), "restarts": 3,
           "faults": [{"kind": "sigkill", "step": args.kill_step, "rank": 1}] if kill else []}
    t_launch = time.time()
    if arm in ("ddp", "torchrun", "torchrun-default"):
        info = run_torchrun(cfg, restarts=3 if kill else 0, fresh_store=arm != "torchrun-default",
                            timeout=args.timeout)
    elif arm == "raytrain":
        info = run_raytrain(cfg)
    elif arm == "raytrain-torchft":
        import peers_torchft

        r = peers_torchft.run_raytrain_torchft_arm(run_dir, cfg["marker_dir"], kill_step=args.kill_step if kill else None,
                                                   steps=cfg["steps"], every=args.every, ranks=WORLD,
                                                   restarts=cfg["restarts"])
        info = {k: r[k] for k in ("ok", "error", "total_s")}
    elif arm == "torchft":
        import peers_torchft

        r = peers_torchft.run_torchft_arm(run_dir, cfg["marker_dir"], kill_step=args.kill_step if kill else None,
                                          steps=cfg["steps"], every=args.every, ranks=WORLD,
                                          timeout_s=3 * args.timeout, restarts=cfg["restarts"])
        info = {"ok": bool(r["final_model"]), "timed_out": r["timed_out"], "total_s": r["total_s"],
                "error": "; ".join(e for es in r["errors"].values() for e in es)[:300] or None,
                "healed": r["healed"]}
    else:
        info = run_elastic(cfg, spares=1 if arm == "elastic+spare" else 0)
    a = bc.analyze_run(run_dir, cfg["marker_dir"])
    info["final"] = final_params(arm, run_dir, cfg["steps"])
    recs = [{**r.__dict__, **bc.phase_breakdown(run_dir, r)} for r in a.recoveries]
    done = max((s for s, _, _ in a.steps), default=0)
    out = {"arm": arm, "run": i, **info, "steps_done": done, "finished": done >= cfg["steps"],
           "step_s": bc.med(a.step_times), "step_times": a.step_times, "ckpt_stalls": a.ckpt_stalls,
           "recoveries": recs, "steps": a.steps, "t_launch": t_launch}
    r = recs[0] if recs else None
    print(f"  {arm:16} run {i}: {'kill' if kill else 'no kill'}, {done}/{cfg['steps']} steps, "
          f"total {info['total_s']:.1f}s, step {out['step_s'] or 0:.4f}s"
          + (f", recovery {r['seconds']:.2f}s, lost {r['lost_steps']}" if r else "")
          + (" TIMED OUT" if info.get("timed_out") else ""), flush=True)
    return out


def final_params(arm: str, run_dir: str, steps: int) -> str | None:
    """The path of a file holding the run's final parameters (a state dict), where the arm leaves
    them at step `steps`: torchrun's last synchronous save, elastic's newest checkpoint, TorchFT's
    final.pt. Ray Train's are not read (None)."""
    import torch

    out = os.path.join(run_dir, "final_params.pt")
    if arm in ("ddp", "torchrun", "torchrun-default"):
        p = os.path.join(run_dir, "ckpt.pt")
        sd = torch.load(p) if os.path.exists(p) else None
        model = sd["model"] if sd and sd["step"] == steps else None
    elif arm.startswith("elastic"):
        from elastic._internal.checkpoint import CheckpointStore

        store = CheckpointStore(os.path.join(run_dir, "ckpt"))
        latest = store.latest()
        model = store.load_full()["model"] if latest is not None and latest.step == steps else None
    elif arm in ("torchft", "raytrain-torchft"):
        p = os.path.join(run_dir, "final.pt")
        model = torch.load(p) if os.path.exists(p) else None
    else:
        model = None
    if model is None:
        return None
    torch.save(model, out)
    return out


def available_arms(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    missing = {}
    if "raytrain" in requested:
        try:
            import ray.train.torch  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            missing["raytrain"] = f"not importable ({type(exc).__name__}); pip install 'ray[train]==2.60.0'"
    if "torchft" in requested:
        import shutil

        try:
            import torchft  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            missing["torchft"] = f"not importable ({type(exc).__name__}); pip install 'torchft>=0.2'"
        else:
            if not shutil.which("torchft_lighthouse", path=os.path.dirname(sys.executable)):
                missing["torchft"] = "torchft_lighthouse not found next to this Python"
    if "raytrain-torchft" in requested:
        try:
            import torchft  # noqa: F401
            from ray.train.v2.torch.torchft_config import TorchftConfig  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            missing["raytrain-torchft"] = (f"not importable ({type(exc).__name__}: {exc}); needs torchft and "
                                           "a Ray whose Train v2 has TorchftConfig")
    return [a for a in requested if a not in missing], missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torchrun-worker", help=argparse.SUPPRESS)
    ap.add_argument("--arms", nargs="+", default=["ddp", "torchrun", "torchrun-default", "raytrain", "torchft",
                                                  "raytrain-torchft", "elastic", "elastic+spare"])
    ap.add_argument("--kills", type=int, default=1, help="separate runs with one kill per fault-tolerant arm")
    ap.add_argument("--default-store-kills", type=int, default=None, help="runs for torchrun-default (default --kills)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--kill-step", type=int, default=50)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--ddp-runs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0, help="bound on one torchrun job (default-store stalls)")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--out-dir", default="bench_out")
    args = ap.parse_args()
    if args.torchrun_worker:
        torch_worker(json.loads(Path(args.torchrun_worker).read_text()))
        return
    arms, missing = available_arms(args.arms)
    root = tempfile.mkdtemp(prefix="bench_peers_")
    before = bc.machine_note()
    runs: list[dict] = []
    torch_arms = [a for a in arms if a in ("ddp", "torchrun", "torchrun-default", "torchft")]
    ray_arms = [a for a in arms if a not in torch_arms]
    if torch_arms and not args.no_warmup:
        one_run("ddp", root, -1, args, kill=False, steps=30)  # warm-up: page cache, imports
    for arm in torch_arms:
        n = args.ddp_runs if arm == "ddp" else (args.default_store_kills or args.kills) \
            if arm == "torchrun-default" else args.kills
        if arm == "torchft":  # one failure-free run first: its step time and its own final model
            runs.append(one_run(arm, root, 0, args, kill=False))
        runs += [one_run(arm, root, i + (arm == "torchft"), args, kill=arm != "ddp") for i in range(n)]
    if ray_arms:
        import ray

        ray.init(num_cpus=WORLD + 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        try:
            for arm in ray_arms:
                if arm == "raytrain-torchft":  # one failure-free run first, as for torchft
                    runs.append(one_run(arm, root, 0, args, kill=False))
                elif not args.no_warmup:
                    one_run(arm if arm == "raytrain" else "elastic", root, -1, args, kill=False, steps=30)
                runs += [one_run(arm, root, i + (arm == "raytrain-torchft"), args, kill=True) for i in range(args.kills)]
        finally:
            ray.shutdown()
    report(runs, missing, args, before)


# -- report ----------------------------------------------------------------------------------------
PEERS = ["ddp", "torchrun", "torchrun-default", "raytrain", "torchft", "raytrain-torchft"]
ELASTIC = ["elastic", "elastic+spare"]


def equal_runs(rs: list[dict], baseline: str | None) -> str:
    """'k/n': runs whose final parameters are torch.equal to the failure-free DDP run's ('—' when
    the arm leaves none or there is no baseline)."""
    import torch

    paths = [r.get("final") for r in rs]
    if baseline is None or not any(paths):
        return "—"
    base = torch.load(baseline)
    eq = 0
    for p in paths:
        if p:
            got = torch.load(p)
            eq += got.keys() == base.keys() and all(torch.equal(got[k], base[k]) for k in base)
    return f"{eq}/{len(rs)}"


def summarize(runs: list[dict], arm: str) -> dict[str, Any]:
    rs = [r for r in runs if r["arm"] == arm]
    recs = [r["recoveries"][0] for r in rs if r["recoveries"]]
    baseline = next((r["final"] for r in runs if r["arm"] == "ddp" and r.get("final")), None)
    pooled = [t for r in rs for t in r["step_times"]]
    return {"runs": len(rs), "finished": sum(r["finished"] for r in rs), "timed_out": sum(bool(r.get("timed_out"))
                                                                                       for r in rs),
            "step_s": bc.med(pooled), "step_runs": [r["step_s"] for r in rs if r["step_s"]],
            "recovery_s": [x["seconds"] for x in recs], "lost": [x["lost_steps"] for x in recs],
            "restart_s": [x["restart"] for x in recs if x["restart"] is not None],
            "restore_s": [x["restore"] for x in recs if x["restore"] is not None],
            "first_s": [x["first"] for x in recs if x["first"] is not None],
            "total_s": [r["total_s"] for r in rs], "stall_s": [s for r in rs for s in r["ckpt_stalls"]],
            "equal_to_ddp": equal_runs(rs, baseline)}


def ratio(e: float | None, p: float | None) -> str:
    if e is None or p is None or p == 0:
        return "—"
    return f"{e / p:.2f}×"


def report(runs: list[dict], missing: dict[str, str], args: argparse.Namespace, before: dict) -> None:
    present = [a for a in args.arms if a not in missing]
    S = {a: summarize(runs, a) for a in present}
    ddp_step = S.get("ddp", {}).get("step_s")
    print(f"\nSame job, 2 ranks, C={args.every}, SIGKILL of rank 1 at step {args.kill_step}; "
          "median (min–max) over runs; seconds")
    rows = []
    for a in args.arms:
        if a in missing:
            rows.append([a, "—", "—", f"MISSING: {missing[a]}"] + ["—"] * 9)
            continue
        s = S[a]
        fin = f"{s['finished']}/{s['runs']}" + (f" ({s['timed_out']} timed out >{args.timeout:g}s)"
                                                 if s["timed_out"] else "")
        rows.append([a, fin, f"{s['step_s']:.4f}" if s["step_s"] else "—", ratio(s["step_s"], ddp_step),
                     bc.spread(s["recovery_s"], "{:.2f}"), bc.spread(s["restart_s"], "{:.2f}"),
                     bc.spread(s["restore_s"], "{:.2f}"), bc.spread(s["first_s"], "{:.3f}"),
                     bc.spread(s["lost"], "{:.0f}"), bc.spread(s["total_s"], "{:.1f}"),
                     bc.spread(s["stall_s"], "{:.4f}"), s["equal_to_ddp"]])
    bc.print_table(["arm", "finished", "step s", "÷ DDP", "recovery", "restart", "restore", "first step", "lost",
                    "total", "ckpt stall", "= DDP"], rows)
    print("  restart = kill → every rank of the new group is in the training code; restore = → state loaded;"
          " first step = → first step completed; = DDP: runs whose final parameters are torch.equal to the"
          " failure-free DDP run's")
    metrics = [("step s", "step_s", False), ("recovery s", "recovery_s", True), ("lost steps", "lost", True),
               ("total s", "total_s", True), ("ckpt stall s", "stall_s", True)]
    peers = [p for p in PEERS if p in S]
    print("\nelastic ÷ peer (medians; < 1 means elastic is faster/smaller): no spare / one spare")
    rrows = []
    for label, key, is_list in metrics:
        val = (lambda a: bc.med(S[a][key]) if is_list else S[a][key]) if True else None
        cells = []
        for p in peers:
            cells.append(" / ".join(ratio(val(e), val(p)) if e in S else "—" for e in ELASTIC))
        rrows.append([label] + cells)
    bc.print_table(["metric"] + [f"vs {p}" for p in peers], rrows)
    verdicts = targets(S)
    print("\nTargets (ratios from this run):")
    for v in verdicts:
        print(f"  {bc.check(v['ok'])} {v['what']}: {v['got']}")
    out = Path(args.out_dir)
    bc.write_json(out / "peers.json", {"machine_before": before, "machine_after": bc.machine_note(),
                                       "args": {k: v for k, v in vars(args).items()}, "missing": missing,
                                       "summary": S, "targets": verdicts, "runs": runs})
    plotted = plot(runs, out / "peers.png")
    print(f"\nwrote {out / 'peers.json'}" + (f" and {out / 'peers.png'}" if plotted else " (no plot: matplotlib missing)")
          + f"; load average before/after: {before['loadavg_1_5_15']} / {bc.machine_note()['loadavg_1_5_15']}")


def targets(S: dict[str, dict]) -> list[dict]:
    m = lambda a, k: bc.med(S[a][k]) if a in S and S[a][k] else None  # noqa: E731
    out = []
    for e in [x for x in ELASTIC if x in S]:
        er = m(e, "recovery_s")
        for peer, need in (("torchrun", 3.0), ("raytrain", 5.0)):
            pr = m(peer, "recovery_s")
            sp = pr / er if pr and er else None
            out.append({"what": f"{e} recovery ≥ {need:g}× faster than {peer}", "ok": None if sp is None else sp >= need,
                        "got": "—" if sp is None else f"{sp:.1f}× ({er:.2f}s vs {pr:.2f}s)"})
        lost = S[e]["lost"]
        peers_lost = ", ".join(f"{p} {m(p, 'lost'):.0f}" for p in ("torchrun", "raytrain") if m(p, "lost") is not None)
        out.append({"what": f"{e} lost work ≤ 1 step", "ok": None if not lost else max(lost) <= 1,
                    "got": f"max {max(lost) if lost else '—'} (peers' median: {peers_lost or '—'})"})
    if "elastic" in S and "ddp" in S and S["elastic"]["step_s"] and S["ddp"]["step_s"]:
        over = S["elastic"]["step_s"] / S["ddp"]["step_s"] - 1
        out.append({"what": "steady-state overhead ≤ 2% over plain DDP", "ok": over <= 0.02,
                    "got": f"{over * 100:+.1f}% ({S['elastic']['step_s']:.4f}s vs {S['ddp']['step_s']:.4f}s)"})
    es, ts = m("elastic", "stall_s"), m("ddp", "stall_s")
    if es and ts:
        out.append({"what": "checkpoint stall ≥ 5× below synchronous torch.save", "ok": ts / es >= 5,
                    "got": f"{ts / es:.1f}× ({es * 1e3:.1f} ms vs {ts * 1e3:.1f} ms)"})
    return out


def plot(runs: list[dict], path: Path) -> bool:
    return bc.plot_step_panels([("One run per arm; × = SIGKILL of rank 1", runs)], path,
                               origin=lambda r: r["t_launch"], xlabel="wall time since launch (s)")


if __name__ == "__main__":
    main()
