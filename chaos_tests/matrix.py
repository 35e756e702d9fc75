"""The full chaos matrix: fault kind x schedule x world size x seed, ending with a table.

    python -m chaos_tests.matrix                         # everything (long: hours on 2 cores)
    python -m chaos_tests.matrix --kinds sigkill,hang --schedules at_step,cascade --workers 2 --seeds 1
    CHAOS_SEED=7 python -m chaos_tests.matrix --kinds raise --schedules several --seeds 1   # replay seed 7

Every run is checked like the CI subset (harness.check); a failed check is counted, printed with
its replay command, and the matrix goes on. Node faults run last, each world size on its own
multi-node cluster (ray.cluster_utils.Cluster: a CPU-less head and one 1-CPU node per worker).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

from chaos_tests import harness
from chaos_tests.schedules import KINDS, SUPPORTED, Schedule, draw


CHURN_BOUNDED = ("sigkill", "segfault")
"""Kinds whose churn runs must also pass harness.check_churn (a death is seen at once; a frozen or
hung rank costs the collective timeout by design)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos_tests.matrix")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--schedules", default=",".join(s.value for s in Schedule))
    p.add_argument("--workers", default="2,3")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (from CHAOS_SEED, default 1, upwards)")
    p.add_argument("--out", type=Path, help="rewrite the table here after every run, so a cut-short matrix still counts")
    args = p.parse_args(argv)
    import ray

    from chaos_tests.conftest import node_cluster, ray_runtime_env
    from elastic.chaos.storage import ENV

    tmp = Path(tempfile.mkdtemp(prefix="chaos-matrix-"))
    rules = tmp / "rules"
    os.environ[ENV] = str(rules)
    first = harness.seed_or(1)
    kinds = args.kinds.split(",")
    cells = [(kind, sched, int(w), seed)
             for kind in kinds
             for sched in [Schedule(s) for s in args.schedules.split(",")] if sched in SUPPORTED[kind]
             for w in args.workers.split(",")
             for seed in range(first, first + args.seeds)]
    # One world size at a time, its node cells last on their own multi-node cluster, so a matrix cut
    # short has covered whole world sizes.
    cells.sort(key=lambda c: (c[2], c[0] == "node"))
    rows: dict[str, dict] = {}
    where, close, cluster = None, lambda: None, None
    try:
        for n, (kind, sched, workers, seed) in enumerate(cells, 1):
            want = ("node", workers) if kind == "node" else ("local", 0)
            if want != where:
                close()
                if kind == "node":
                    cluster, close = node_cluster(workers, str(rules))
                else:
                    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                             runtime_env=ray_runtime_env(str(rules)))
                    cluster, close = None, ray.shutdown
                where = want
            row = rows.setdefault(kind, {"runs": 0, "finished": 0, "equal": 0, "rec": [], "lost": 0})
            row["runs"] += 1
            _one(kind, sched, workers, seed, tmp / f"r{n}", row, cluster=cluster)
            if args.out:
                args.out.write_text(f"{n}/{len(cells)} runs\n{table(rows)}\n")
    finally:
        close()
    print(table(rows))
    return 0 if all(r["equal"] == r["runs"] for r in rows.values()) else 1


def _one(kind: str, sched: Schedule, workers: int, seed: int, root: Path, row: dict, *, cluster=None) -> None:
    plan = draw(kind, sched, seed, workers)
    label = f"{kind}/{sched.value}/w{workers}/seed{seed}"
    t0 = time.monotonic()
    try:
        job = plan.job(root, storage_wrapper=kind != "kill_driver")
        plan.arm_storage(job, os.environ["ELASTIC_CHAOS_STORAGE"])
        ref = harness.reference(root.parent, job)
        if kind == "kill_driver":
            import ray

            out = harness.run_driver(job, plan.actions, ray.get_runtime_context().gcs_address)
        else:
            out = harness.run(job, plan.actions, cluster=cluster)
            if kind == "kill_supervisor":
                harness.procs.wait_gone(timeout_s=30)
                out.raised, out.result = None, harness.resume(job)
        finished = out.raised is None and (out.result is None or out.result.ok)
        row["finished"] += finished
        figures = harness.check(out, ref, exact=plan.exact, expect_markers=plan.n_faults, corrupted=plan.corrupted)
        if sched is Schedule.CHURN and kind in CHURN_BOUNDED:
            harness.check_churn(out.events, bound_s=harness.churn_bound_s(job))
        row["equal"] += 1
        row["rec"] += figures["recovery_s"]
        row["lost"] = max(row["lost"], figures["lost"])
        print(f"ok    {label} {time.monotonic() - t0:.1f}s {plan.describe()}", flush=True)
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"FAIL  {label}: {type(exc).__name__}: {str(exc)[:300]}\n      replay: CHAOS_SEED={seed} python -m "
              f"chaos_tests.matrix --kinds {kind} --schedules {sched.value} --workers {workers} --seeds 1",
              flush=True)
        if os.environ.get("CHAOS_DEBUG"):
            traceback.print_exc()


def table(rows: dict[str, dict]) -> str:
    head = f"{'fault kind':<16} {'runs':>5} {'finished':>9} {'equal':>6} {'median rec s':>13} {'max rec s':>10} " \
           f"{'max lost':>9}"
    lines = [head, "-" * len(head)]
    for kind, r in rows.items():
        med = f"{statistics.median(r['rec']):.2f}" if r["rec"] else "-"
        mx = f"{max(r['rec']):.2f}" if r["rec"] else "-"
        lines.append(f"{kind:<16} {r['runs']:>5} {r['finished']:>9} {r['equal']:>6} {med:>13} {mx:>10} {r['lost']:>9}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
