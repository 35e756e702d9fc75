"""Recovery and join benchmark for elastic (issue 3) on a small CPU machine.

For each world size (--workers) and spare count (--spares) it runs the bench_common job and lets
rank 1.. SIGKILL itself at planned steps (elastic.chaos.faults, marker = pid + kill time). Each kill
is broken down from the run's events and rank 0's step log:

  detect     worker_failed.time − kill time
  rebuild    group_built.time − worker_failed.time      (quiesce survivors, place a replacement)
  transfer   last restored.time − group_built.time      (new process group + state from a peer)
  first      first step completed in the new group − last restored.time
  recovery   kill → first step completed in the new group (the sum of the four)

plus lost steps (completed steps recomputed). The join test starts a `ray.cluster_utils.Cluster`
with 2 CPUs, runs min_workers=2, max_workers=4 and adds a 2-CPU node mid-run; the join pause is the
gap in rank 0's step timestamps across the `resized` event.

Quick:  python scripts/bench_recovery.py --kills 2 --joins 1
Full:   python scripts/bench_recovery.py --kills 5 --joins 3     (≈ 6 min on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from elastic._internal.waiting import wait_until  # noqa: E402

TARGETS = {"recovery_no_spare_s": 2.0, "recovery_spare_s": 1.0, "lost_steps": 1, "join_pause_s": 1.0}


def fit(config: dict, *, workers: int, max_workers: int, spares: int, every: int, replacement: str = "wait") -> Any:
    import elastic

    # "continue" needs room to shrink: the survivors go on alone until the replacement is ready.
    min_workers = workers - 1 if replacement == "continue" else workers
    return elastic.ElasticTrainer(
        bc.elastic_train, train_loop_config=config, name="bench",
        scaling=elastic.ScalingConfig(min_workers=min_workers, max_workers=max_workers, spares=spares,
                                      replacement=replacement, grow_interval_s=0.5),
        checkpoint=elastic.CheckpointConfig(uri=os.path.join(config["run_dir"], "ckpt"), every_n_steps=every),
        failure=elastic.FailureConfig(max_failures=20)).fit(quiet=True)


def breakdown(events: list[dict], rec: bc.Recovery, kill_pid: int) -> dict[str, float | None]:
    """Supervisor-side phases of one recovery, from the run's events."""
    failed = next((e for e in events if e["event"] == "worker_failed" and e.get("pid") == kill_pid), None)
    if failed is None:
        return {"detect": None, "rebuild": None, "transfer": None, "first": None}
    built = next((e for e in events if e["event"] == "group_built" and e["time"] >= failed["time"]), None)
    gen = built["generation"] if built else None
    restored = [e["time"] for e in events if e["event"] == "restored" and e.get("generation") == gen]
    t_rest = max(restored) if restored else None
    return {"detect": failed["time"] - rec.kill_time,
            "rebuild": built["time"] - failed["time"] if built else None,
            "transfer": t_rest - built["time"] if built and t_rest else None,
            "first": rec.first_new_time - t_rest if t_rest else None,
            "source": next((e.get("source") for e in events if e["event"] == "restored"
                            and e.get("generation") == gen and e.get("rank") == 0), None)}


def kill_runs(workers: int, spares: int, kills: int, per_run: int, gap: int, every: int, root: str,
              replacement: str = "wait", first: int = 30) -> list[dict]:
    out: list[dict] = []
    run = 0
    while len(out) < kills:
        n = min(per_run, kills - len(out))
        run_dir = tempfile.mkdtemp(prefix=f"w{workers}s{spares}r{run}_", dir=root)
        marker_dir = os.path.join(run_dir, "markers")
        faults = [{"kind": "sigkill", "step": first + i * gap, "rank": 1 + i % (workers - 1)} for i in range(n)]
        cfg = {"steps": first + (n - 1) * gap + 40, "every": every, "run_dir": run_dir, "marker_dir": marker_dir,
               "faults": faults}
        t0 = time.time()
        result = fit(cfg, workers=workers, max_workers=workers, spares=spares, every=every, replacement=replacement)
        a = bc.analyze_run(run_dir, marker_dir)
        kills_by_time = {round(k[2], 6): k[1] for k in bc.read_kills(marker_dir)}
        for rec in a.recoveries:
            pid = kills_by_time.get(round(rec.kill_time, 6), -1)
            out.append({"workers": workers, "spares": spares, "replacement": replacement, "run": run,
                        "kill_step": rec.kill_step,
                        "recovery_s": rec.seconds, "lost_steps": rec.lost_steps,
                        **breakdown(result.events, rec, pid),
                        "supervisor_recovered_s": None, "step_s": bc.med(a.step_times)})
        sup = [e for e in result.events if e["event"] == "recovered"]
        for o, e in zip(out[-len(a.recoveries):] if a.recoveries else [], sup):
            o["supervisor_recovered_s"] = e["seconds"]
            o["supervisor_lost_steps"] = e["lost_steps"]
        print(f"  w={workers} spares={spares} {replacement} run {run}: {len(a.recoveries)}/{n} kills measured, "
              f"{result.steps} steps in {time.time() - t0:.1f}s, "
              + ", ".join(f"{r.seconds:.2f}s" for r in a.recoveries), flush=True)
        run += 1
    return out


def join_runs(joins: int, every: int, root: str) -> list[dict]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    out = []
    try:
        for j in range(joins):
            run_dir = tempfile.mkdtemp(prefix=f"join{j}_", dir=root)
            cfg = {"steps": 20000, "every": every, "run_dir": run_dir, "marker_dir": run_dir,
                   "steps_after_resize": 60}
            box: dict[str, Any] = {}
            th = threading.Thread(target=lambda: box.update(r=fit(cfg, workers=2, max_workers=4, spares=0,
                                                                  every=every)), daemon=True)
            th.start()
            wait_until(lambda: len(bc.read_steps(run_dir)) >= 40, timeout_s=120, interval_s=0.1)
            node = cluster.add_node(num_cpus=2)
            t_add = time.time()
            th.join(timeout=180)
            cluster.remove_node(node)
            if "r" not in box:
                print(f"  join {j}: run did not finish", flush=True)
                continue
            events = box["r"].events
            resized = next((e for e in events if e["event"] == "resized"), None)
            rows = bc.read_steps(run_dir)
            gen0 = rows[0][2]
            old = [r for r in rows if r[2] == gen0]
            new = [r for r in rows if r[2] > gen0]
            a = bc.analyze_run(run_dir)
            o = {"join": j, "node_added_at": t_add, "resized_event_s": resized and resized["seconds"],
                 "pause_s": new[0][1] - old[-1][1] if old and new else None,
                 "world_before": 2, "world_after": resized and resized["world_size"],
                 "step_s": bc.med(a.step_times), "add_to_resume_s": new[0][1] - t_add if new else None}
            out.append(o)
            print(f"  join {j}: pause {o['pause_s']}, world -> {o['world_after']}, "
                  f"node added → first step at 4: {o['add_to_resume_s']}", flush=True)
            time.sleep(1.0)  # let the removed node's workers go
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--spares", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--kills", type=int, default=2, help="kills per (workers, spares) configuration")
    ap.add_argument("--kills-per-run", type=int, default=5, help="kills inside one run, --gap steps apart")
    ap.add_argument("--gap", type=int, default=300, help="steps between kills in one run (lets a new spare warm up)")
    ap.add_argument("--first", type=int, default=30,
                    help="step of the first kill (the node standby starts 10 s into the run's first group: kill later to measure it)")
    ap.add_argument("--every", type=int, default=20, help="checkpoint interval (steps)")
    ap.add_argument("--joins", type=int, default=1)
    ap.add_argument("--continue-mode", action="store_true",
                    help="also measure replacement='continue' without spares (survivors go on, grow back later)")
    ap.add_argument("--out", default="bench_out/recovery.json")
    ap.add_argument("--keep", action="store_true", help="keep run directories")
    args = ap.parse_args()

    import ray

    root = tempfile.mkdtemp(prefix="bench_recovery_")
    before = bc.machine_note()
    kills: list[dict] = []
    if args.kills:
        ray.init(num_cpus=max(args.workers) + max(args.spares), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        try:
            for w in args.workers:
                for s, mode in configs(args):
                    kills += kill_runs(w, s, args.kills, args.kills_per_run, args.gap, args.every, root, mode,
                                       first=args.first)
        finally:
            ray.shutdown()
    joins = join_runs(args.joins, args.every, root) if args.joins else []
    report(kills, joins, args, before)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def configs(args: argparse.Namespace) -> list[tuple[int, str]]:
    out = [(s, "wait") for s in args.spares]
    return out + [(0, "continue")] if args.continue_mode else out


def report(kills: list[dict], joins: list[dict], args: argparse.Namespace, before: dict) -> None:
    print(f"\nRecovery after SIGKILL (median (min–max) seconds; {args.kills} kills per row)")
    rows = []
    verdicts: dict[str, Any] = {}
    for w in args.workers:
        for s, mode in configs(args):
            ks = [k for k in kills if k["workers"] == w and k["spares"] == s and k.get("replacement", "wait") == mode]
            col = lambda key: [k[key] for k in ks if k.get(key) is not None]  # noqa: E731
            target = TARGETS["recovery_spare_s" if s else "recovery_no_spare_s"]
            m = bc.med(col("recovery_s"))
            ok = None if m is None else m <= target
            lost_ok = None if not ks else max(col("lost_steps")) <= TARGETS["lost_steps"]
            verdicts[f"w{w}_spares{s}_{mode}"] = {"recovery_median_s": m, "target_s": target, "ok": ok,
                                           "lost_max": max(col("lost_steps"), default=None), "lost_ok": lost_ok}
            rows.append([w, s if mode == "wait" else "0 (continue)", len(ks), bc.spread(col("recovery_s")), f"{check(ok)} ≤{target:g}",
                         bc.spread(col("detect")), bc.spread(col("rebuild")), bc.spread(col("transfer")),
                         bc.spread(col("first")), bc.spread(col("lost_steps"), "{:.0f}"), check(lost_ok),
                         bc.spread(col("supervisor_recovered_s")), bc.spread(col("step_s"), "{:.4f}")])
    bc.print_table(["workers", "spares", "n", "recovery s", "target", "detect", "rebuild", "transfer", "first step",
                    "lost", "≤1", "supervisor 'recovered'", "step s"], rows)
    if joins:
        pauses = [j["pause_s"] for j in joins if j["pause_s"] is not None]
        ok = None if not pauses else bc.med(pauses) <= TARGETS["join_pause_s"]
        verdicts["join"] = {"pause_median_s": bc.med(pauses), "target_s": TARGETS["join_pause_s"], "ok": ok}
        print(f"\nNode join 2 → 4 workers ({len(joins)} joins)")
        bc.print_table(["pause s (step gap)", "target", "supervisor 'resized' s", "node added → first step at 4 s",
                        "step s"],
                       [[bc.spread(pauses), f"{check(ok)} ≤1", bc.spread([j["resized_event_s"] for j in joins
                                                                         if j["resized_event_s"] is not None]),
                         bc.spread([j["add_to_resume_s"] for j in joins if j["add_to_resume_s"] is not None]),
                         bc.spread([j["step_s"] for j in joins if j["step_s"]], "{:.4f}")]])
    bc.write_json(args.out, {"machine_before": before, "machine_after": bc.machine_note(), "args": vars(args),
                             "targets": TARGETS, "verdicts": verdicts, "kills": kills, "joins": joins})
    print(f"\nwrote {args.out}; load average before/after: {before['loadavg_1_5_15']} / "
          f"{bc.machine_note()['loadavg_1_5_15']}")


check = bc.check

if __name__ == "__main__":
    main()
