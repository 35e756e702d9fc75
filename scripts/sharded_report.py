"""bench_sharded's report for the one-kill arms: per (world size, arm) summaries over the runs, the
table, the verdicts against issue 13's and issue 26's targets, sharded.json / sharded.txt and the
plot."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path
from typing import Any

import bench_common as bc

TARGETS = {"beyond_step_s": 1.0, "vs_checkpoint": 3.0, "lost_steps": 1, "step_ratio": 1.10, "host_x_shard": 3.0}
"""Issue 26: recovery (buddy, buddy+spare, hsdp) ≤ beyond_step_s + one step (the arm's own median
step); the buddy path ≥ vs_checkpoint× faster than the checkpoint path and than torchrun + dcp.load;
steady state ≤ step_ratio× plain FSDP2; snapshot + buddy copies ≤ host_x_shard× the shard."""


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
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the table and verdicts also go to sharded.txt
        verdicts = table(S, args, params)
    print(buf.getvalue(), end="")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sharded.txt").write_text(buf.getvalue())
    bc.write_json(out / "sharded.json", {"machine_before": before, "machine_after": bc.machine_note(),
                                         "params": params, "args": vars(args), "targets": verdicts,
                                         "summary": {f"{w}/{a}": s for (w, a), s in S.items()}, "runs": runs})
    plotted = plot(runs, out / "sharded.png")
    print(f"\nwrote {out / 'sharded.json'}, sharded.txt" + (" and sharded.png" if plotted else "")
          + f"; load average before/after: {before['loadavg_1_5_15']} / {bc.machine_note()['loadavg_1_5_15']}")


def table(S: dict, args: argparse.Namespace, params: int) -> list[dict]:
    """Print the table and the verdicts; return the verdicts."""
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
          " copies = snapshot + buddy buffers at the end (hsdp: no buddy buffers, the replica is live);"
          " step s of an arm with a kill includes the steps after its recovery (a successor standby starting):"
          " the steady state is the elastic arm's")
    verdicts = targets(S, args)
    print("\nTargets (from this run):")
    for v in verdicts:
        print(f"  {bc.check(v['ok'])} {v['what']}: {v['got']}")
    return verdicts


def targets(S: dict, args: argparse.Namespace) -> list[dict]:
    m = lambda w, a, k: bc.med(S[(w, a)][k]) if (w, a) in S and S[(w, a)][k] else None  # noqa: E731
    out = []
    for w in args.ranks:
        for arm in ("buddy", "buddy+spare", "hsdp"):
            out += _one_step_bound(S, w, arm)
        b, c, t = m(w, "buddy", "recovery_s"), m(w, "checkpoint", "recovery_s"), m(w, "torchrun-dcp", "recovery_s")
        for name, other in (("the checkpoint path", c), ("torchrun + dcp.load", t)):
            out.append({"what": f"{w} ranks: buddy path ≥ {TARGETS['vs_checkpoint']:g}× faster than {name}",
                        "ok": None if not (b and other) else other / b >= TARGETS["vs_checkpoint"],
                        "got": "—" if not (b and other) else f"{other / b:.1f}× ({b:.2f} s vs {other:.2f} s)"})
        lost = [x for a in ("buddy", "buddy+spare", "hsdp") if (w, a) in S for x in S[(w, a)]["lost"]]
        out.append({"what": f"{w} ranks: lost work ≤ {TARGETS['lost_steps']} step", "got": f"max {max(lost) if lost else '—'}",
                    "ok": None if not lost else max(lost) <= TARGETS["lost_steps"]})
        for arm in ("elastic", "overlap", "loopback"):  # the default, buddy_overlap=True, buddy_shm=False
            if (w, arm) in S:
                out += _steady(S, w, arm, m(w, arm, "copies_x_shard"))
    return out


def _steady(S: dict, w: int, arm: str, x: float | None) -> list[dict]:
    """An arm without failures: its step against plain FSDP2's, its host copies against the shard."""
    e, f = S[(w, arm)].get("step_s"), S.get((w, "fsdp"), {}).get("step_s")
    name = "" if arm == "elastic" else f" ({arm})"
    return [{"what": f"{w} ranks: steady state{name} ≤ {TARGETS['step_ratio']:.2f}× plain FSDP2",
             "ok": None if not (e and f) else e / f <= TARGETS["step_ratio"],
             "got": "—" if not (e and f) else f"{e / f:.2f}× ({e:.3f} s vs {f:.3f} s)"},
            {"what": f"{w} ranks: host copies{name} (snapshot + buddy) ≤ {TARGETS['host_x_shard']:g}× the shard",
             # + 1e-3: the snapshot also holds the replicated per-parameter step counters (~1e-5)
             "ok": None if x is None else x <= TARGETS["host_x_shard"] + 1e-3,
             "got": "—" if x is None else f"{x:.2f}×"}]


def _one_step_bound(S: dict, w: int, arm: str) -> list[dict]:
    """Kill → first step counted ≤ 1 s + one step (the arm's own median steady step)."""
    s = S.get((w, arm))
    if s is None:
        return []
    r, step = bc.med(s["recovery_s"]) if s["recovery_s"] else None, s["step_s"]
    bound = TARGETS["beyond_step_s"] + (step or 0.0)
    return [{"what": f"{w} ranks: {arm} recovery ≤ {TARGETS['beyond_step_s']:g} s + one step",
             "ok": None if r is None or step is None else r <= bound,
             "got": "—" if r is None else f"{r:.2f} s (bound {bound:.2f} s; restored from "
                                          f"{','.join(s['restored_from']) or '—'}; lost {max(s['lost'], default='—')})"}]


def plot(runs: list[dict], path: Path) -> bool:
    panels = [(f"{w} ranks; × = SIGKILL", [r for r in runs if r["world"] == w]) for w in sorted({r["world"] for r in runs})]
    return bc.plot_step_panels(panels, path, origin=lambda r: r["steps"][0][1], xlabel="seconds since the first step")


