"""Goodput under a failure schedule (issue 24): the same job, the same kill times, every arm.

A seeded schedule of faults (exponential gaps with mean --gap seconds, counted from the arm's first
completed step) is inflicted from outside on a random live training rank — the same times and the
same picks for every arm. Every rank of every arm records its pid when it enters the training code
(bench_common.register_pid), which is where victims are picked from.

Arms (2 ranks, bench_common's job with a --hidden MLP, checkpoint every --every steps):
  ddp            torchrun without failures (the reference parameters)
  torchrun       torchrun --max-restarts, fresh store per restart, synchronous torch.save
  elastic        elastic with its defaults (node standby), max_failures unlimited
  elastic+spare  the same with --spares 1
  torchft        TorchFT (peers_torchft.run_torchft_arm): a lighthouse, one replica group per rank, each
                 under torchrun --max-restarts; a restarted group heals from the live one
  raytrain-torchft  the same TorchFT loop under Ray Train v2's TorchftConfig
(an arm whose packages are missing is skipped, as in bench_peers)

Per arm and schedule: ETTR (the arm's own failure-free time from first to last step divided by the
same under the schedule), the cost of each failure (kill -> a completed step beyond the newest step
before the kill; median, p90, max), steps lost, checkpoint fallbacks (elastic: a restore from a
checkpoint; torchrun: every restart), and whether the final parameters equal the failure-free DDP
run's.

TorchFT arms: the victim is a replica group's worker process (torchrun / Ray Train restarts it).
Their step rows are the job's progress, every step any replica group committed
(peers_torchft.job_steps), not group 0's steps.log alone: the survivor trains on while group 0 is
down. Their checkpoint fallbacks count the quorums in which a restarted group went on from ckpt.pt
(or from scratch) because no live group was ahead of it, rather than healing from a live peer; the
number of restarts is printed per run. With torchft 0.2's own DDP comm hook, a kill that lands while
the survivor is in its gradient allreduce kills the survivor too (`assert fut._fut`, see
peers_torchft); --torchft-patched-hook uses the hook that honours the failed allreduce instead.

--fault node (elastic arms only): loss of a whole Ray node. Each elastic run, failure-free runs
included, gets a fresh ray.cluster_utils.Cluster: a CPU-less head (driver and supervisor) and
WORLD + --spare-nodes one-CPU nodes, so ranks and spares each reserve a node of their own and a
node's standby lives beside its rank. At each scheduled time the node that hosts a random live rank
(its registered pid -> the node id elastic reports for that pid in events.jsonl) is removed with
Cluster.remove_node(allow_graceful=False), and a fresh one-CPU node is added --node-delay s later
(a spot replacement arriving late; meanwhile the cluster is one node short). The head runs with
Ray's node health checks lowered as an operator of a spot cluster would set them
(NODE_HEALTH_CHECKS: health_check_period_ms=1000, health_check_failure_threshold=3, so a removed
node is declared dead after about 3 s instead of about 15 s). torchrun, torchft and
raytrain-torchft are skipped under --fault node: their ranks are local processes of one host here,
with no Ray node to lose (raytrain-torchft on the same Cluster would be an honest equivalent; not
done). ddp still runs, failure-free, as the reference parameters.

Quick:  python scripts/bench_churn.py --seeds 0 --gaps 8
Full:   python scripts/bench_churn.py --seeds 0 1 2 --gaps 8 30
Writes bench_out/churn.json, churn.txt and churn.png (--out-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import bench_peers as bp  # noqa: E402

WORLD = 2
TORCHFT_ARMS = ("torchft", "raytrain-torchft")
NODE_ARMS = ("ddp", "elastic", "elastic+spare")
"""Arms run under --fault node (ddp only as the failure-free reference)."""
NODE_SKIP = {
    "torchrun": "n/a (single host): torchrun's ranks are local processes under one agent, no Ray node to lose",
    "torchft": "n/a (single host): one torchrun per replica group on this host, no Ray node to lose",
    "raytrain-torchft": "n/a: not run on the multi-node Cluster (Ray Train there with remove_node would be "
                        "the honest equivalent; not implemented)",
}


# -- the failure schedule ----------------------------------------------------------------------------
def schedule(seed: int, gap: float, horizon: float) -> list[tuple[float, float]]:
    """(seconds after the first step, a uniform draw picking the victim) up to `horizon`."""
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(1.0 / gap)
        if t > horizon:
            return out
        out.append((t, rng.random()))


def live_ranks(run_dir: str) -> list[tuple[int, int, int]]:
    """(rank, -generation, pid) of every registered training process still alive, newest first per rank."""
    out = []
    d = Path(run_dir) / "pids"
    for p in d.glob("*") if d.exists() else []:
        pid = int(p.name)
        try:
            rank, gen = map(int, p.read_text().split())
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError):
            continue
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            continue
        out.append((rank, -gen, pid))
    best: dict[int, tuple[int, int, int]] = {}
    for r in sorted(out):
        best.setdefault(r[0], r)
    return sorted(best.values())


class Killer(threading.Thread):
    """Waits for the arm's first step, then faults a live rank at each scheduled time.

    fault: "kill" (SIGKILL), "term" (SIGTERM, a preemption notice, then SIGKILL after `grace` s if
    the process is still there). aim: a share of the faults (drawn from the schedule's own random
    numbers, so the same for every arm) is moved to `aim_after` s after the previous fault, i.e.
    into the recovery that fault started (a kill of a rank that was just promoted, rebuilt or
    restored)."""

    def __init__(self, run_dir: str, plan: list[tuple[float, float]], *, fault: str = "kill", grace: float = 5.0,
                 aim: float = 0.0, aim_after: float = 0.4):
        super().__init__(daemon=True)
        self.run_dir, self.fault, self.grace = run_dir, fault, grace
        self.plan = aimed(plan, aim, aim_after)
        self.stop = threading.Event()
        self.kills: list[dict[str, Any]] = []
        self.t0: float | None = None

    def due(self) -> Iterator[tuple[float, float]]:
        """Each planned fault (its time `at` and draw `u`), when due (counted from the run's first step); ends when
        stopped."""
        while not self.stop.is_set() and self.t0 is None:
            rows = bc.read_steps(self.run_dir)
            if rows:
                self.t0 = rows[0][1]
            else:
                self.stop.wait(0.05)
        for at, u in self.plan:
            assert self.t0 is not None
            if self.stop.wait(max(0.0, self.t0 + at - time.time())):
                return
            yield at, u

    def run(self) -> None:
        for at, u in self.due():
            live = live_ranks(self.run_dir)
            if not live:
                continue
            rank, _, pid = live[min(len(live) - 1, int(u * len(live)))]
            try:
                os.kill(pid, signal.SIGTERM if self.fault == "term" else signal.SIGKILL)
            except ProcessLookupError:
                continue
            if self.fault == "term":
                threading.Timer(self.grace, _kill_quietly, args=(pid,)).start()
            self.kills.append({"at": at, "time": time.time(), "rank": rank, "pid": pid, "fault": self.fault})


def aimed(plan: list[tuple[float, float]], share: float, after: float) -> list[tuple[float, float]]:
    """Move `share` of the faults (those whose draw u falls below it, rescaled) to `after` seconds
    past the previous one: faults aimed at a recovery in progress."""
    out: list[tuple[float, float]] = []
    for at, u in plan:
        if out and u < share:
            out.append((out[-1][0] + after, u / share))
        else:
            out.append((at, u))
    return out


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class NodeKiller(Killer):
    """fault "node": at each scheduled time, removes (Cluster.remove_node, not graceful) the Ray node
    that hosts a random live rank, and adds a fresh one-CPU node `delay` s later. run() is called on
    the main thread (Cluster.add_node installs signal handlers), which adds the nodes; the removals
    run in a thread of their own, so that a node start (1-2 s here) never delays a scheduled
    removal. `cluster` is set once the run's cluster is up.

    Each removal records `gone`: when the victim's process had exited. A removed node's Ray workers
    notice their raylet is gone and exit a second or two later, training meanwhile, so analyze()
    takes the newest step before `gone` (not before the removal) as the one to get beyond."""

    def __init__(self, run_dir: str, plan: list[tuple[float, float]], *, uri: str, delay: float,
                 aim: float = 0.0, aim_after: float = 0.4):
        super().__init__(run_dir, plan, fault="node", aim=aim, aim_after=aim_after)
        self.uri, self.delay = uri, delay
        self.cluster: Any = None
        self.adds: list[dict[str, Any]] = []
        self._due: list[float] = []  # when each removed node's replacement is to be added
        self._lock = threading.Lock()

    def run(self) -> None:
        remover = threading.Thread(target=self._removals, name="node-remover", daemon=True)
        remover.start()
        while not self.stop.is_set():
            with self._lock:
                due = [d for d in self._due if d <= time.time()]
                for d in due:
                    self._due.remove(d)
                pending = bool(self._due)
            for _ in due:
                t = time.time()
                node = self.cluster.add_node(wait=False, num_cpus=1)  # it registers while the schedule goes on
                self.adds.append({"time": t, "node": node.node_id[:8], "seconds": time.time() - t})
            if not due and not pending and not remover.is_alive():
                break
            self.stop.wait(0.05)
        remover.join(5)

    def _removals(self) -> None:
        for at, u in self.due():
            victims = self.victims()
            if not victims:
                continue
            rank, pid, node = victims[min(len(victims) - 1, int(u * len(victims)))]
            t = time.time()
            try:
                self.cluster.remove_node(node, allow_graceful=False)
                error = None
            except Exception as exc:  # noqa: BLE001 - e.g. Ray's "zombie processes left" assertion
                error = f"{type(exc).__name__}: {exc}"
                print(f"    remove_node({node.node_id[:8]}) raised {error}", flush=True)
            rec = {"at": at, "time": t, "rank": rank, "pid": pid, "fault": "node", "node": node.node_id[:8],
                   "remove_s": time.time() - t, **({"error": error} if error else {})}
            self.kills.append(rec)
            threading.Thread(target=_mark_gone, args=(rec, pid), daemon=True).start()
            with self._lock:
                self._due.append(time.time() + self.delay)

    def victims(self) -> list[tuple[int, int, Any]]:
        """(rank, pid, node) of every live registered rank whose node is still in the cluster."""
        from elastic._internal.events import read_events

        where = {m["pid"]: m.get("node_id") for e in read_events(self.uri) if e.get("event") == "group_built"
                 for m in e.get("members", []) if m.get("pid") is not None}
        nodes = {n.node_id: n for n in list(self.cluster.worker_nodes)}
        out = []
        for rank, _, pid in live_ranks(self.run_dir):
            node = nodes.get(where.get(pid) or "") or _node_by_ancestry(pid, nodes.values())
            if node is not None:
                out.append((rank, pid, node))
        return out


def _mark_gone(rec: dict[str, Any], pid: int, limit_s: float = 60.0) -> None:
    """Set rec["gone"] to when process `pid` has exited (or is a zombie); polled every 5 ms."""
    end = time.time() + limit_s
    while time.time() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                break
        except (OSError, IndexError):
            break
        time.sleep(0.005)
    else:
        return
    rec["gone"] = time.time()


def _node_by_ancestry(pid: int, nodes: Any) -> Any:
    """The Cluster node whose raylet is an ancestor of `pid` (Ray workers are the raylet's
    children); None if none is."""
    raylets = {}
    for n in nodes:
        for info in getattr(n, "all_processes", {}).get("raylet", []):
            raylets[info.process.pid] = n
    seen = 0
    while pid > 1 and seen < 64:
        if pid in raylets:
            return raylets[pid]
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return None
        seen += 1
    return None


# -- one run ---------------------------------------------------------------------------------------
def run_arm(arm: str, root: str, args: argparse.Namespace, plan: list[tuple[float, float]] | None,
            label: str) -> dict[str, Any]:
    run_dir = tempfile.mkdtemp(prefix=f"{arm}_{label}_", dir=root)
    cfg = {"steps": args.steps, "every": args.every, "run_dir": run_dir, "hidden": args.hidden,
           "marker_dir": os.path.join(run_dir, "markers"), "restarts": 1000, "faults": []}
    node = args.fault == "node"
    if node:
        killer: Killer = NodeKiller(run_dir, plan or [], uri=os.path.join(run_dir, "ckpt"), delay=args.node_delay,
                                    aim=args.aim)
    else:
        killer = Killer(run_dir, plan or [], fault=args.fault, grace=args.grace, aim=args.aim)
    if plan and not node:
        killer.start()
    t_launch = time.time()
    events: list[dict] = []
    try:
        if arm in ("ddp", "torchrun"):
            info = bp.run_torchrun(cfg, restarts=1000 if plan else 0, fresh_store=True, timeout=args.timeout)
            info["ok"] = info["rc"] == 0
        elif arm in TORCHFT_ARMS:
            info = run_torchft(arm, cfg, args.timeout, args.torchft_patched_hook)
        elif node:
            info, events = run_elastic_nodes(cfg, spares=1 if arm == "elastic+spare" else 0, args=args,
                                             killer=killer if plan else None)
        else:
            info, events = run_elastic(cfg, spares=1 if arm == "elastic+spare" else 0, timeout=args.timeout)
    finally:
        killer.stop.set()
        if killer.is_alive():
            killer.join(timeout=5)
    rows = bc.read_steps(run_dir)
    if arm in TORCHFT_ARMS:  # the job's progress: steps committed by any replica group
        import peers_torchft as pt

        rows = pt.job_steps(run_dir, WORLD)
        events = pt.read_heals(run_dir)
        info["restarted"] = restarted(run_dir)
    out = {"arm": arm, "label": label, "run_dir": run_dir, **info, "t_launch": t_launch,
           "steps": [(s, t, g) for s, t, g, _, _ in rows], "kills": killer.kills,
           **({"node_adds": killer.adds} if node else {}),
           **({"heals": events} if arm in TORCHFT_ARMS else {})}
    out.update(analyze(rows, killer.kills, arm, events, args.steps))
    out["final"] = bp.final_params("elastic" if arm.startswith("elastic") else arm, run_dir, args.steps)
    costs = out["costs"]
    print(f"  {arm:14} {label:10} {out['done']}/{args.steps} steps in {out['train_s']:.1f}s; "
          f"{len(killer.kills)} {'node removals' if node else 'kills'}; "
          f"costs {', '.join(f'{c:.2f}' for c in costs) or '—'}; lost {out['lost']}; "
          f"checkpoint fallbacks {out['fallbacks']}"
          + (f" (replica restarts {info['restarted']}; state at a restart's first quorum: {sources(events)})"
             if arm in TORCHFT_ARMS else "")
          + (f"; nodes added {len(killer.adds)}; victims exited "
             f"{', '.join(fmt(k['gone'] - k['time']) if 'gone' in k else '?' for k in killer.kills) or '—'} s "
             f"after their node's removal" if node and plan else "")
          + ("" if info.get("ok", True) else f"; FAILED {info.get('error') or info.get('rcs')}"), flush=True)
    return out


def elastic_trainer(cfg: dict, spares: int) -> Any:
    import elastic

    return elastic.ElasticTrainer(
        bc.elastic_train, train_loop_config=cfg, name="churn",
        scaling=elastic.ScalingConfig(min_workers=WORLD, max_workers=WORLD, spares=spares),
        checkpoint=elastic.CheckpointConfig(uri=os.path.join(cfg["run_dir"], "ckpt"), every_n_steps=cfg["every"]),
        failure=elastic.FailureConfig(max_failures=-1))


def run_elastic(cfg: dict, spares: int, timeout: float) -> tuple[dict, list[dict]]:
    t0 = time.time()
    trainer = elastic_trainer(cfg, spares)
    watchdog = threading.Timer(timeout, lambda: os.kill(os.getpid(), signal.SIGINT))
    watchdog.start()
    try:
        r = trainer.fit(quiet=True, raise_on_failure=False)
    finally:
        watchdog.cancel()
    return ({"ok": r.ok, "error": r.error, "total_s": time.time() - t0,
             "summary": r.summary() if hasattr(r, "summary") else None}, list(r.events))


NODE_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
"""Ray's node health checks as an operator of a spot cluster sets them (`ray start --head
--system-config`): a node that stops answering is declared dead after about 3 s instead of Ray's
default (period 3000 ms x threshold 5: about 15 s). Names as in Ray 2.60's ray_config_def.h."""


def node_cluster(nodes: int) -> Any:
    """A fresh ray.cluster_utils.Cluster, connected to: a CPU-less head (the driver and elastic's
    supervisor, which it pins to the driver's node) and `nodes` one-CPU nodes. The head runs with
    NODE_HEALTH_CHECKS, so a removed node is declared dead within about 3 s."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "_system_config": dict(NODE_HEALTH_CHECKS)})
    for _ in range(nodes):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    return c


def run_elastic_nodes(cfg: dict, spares: int, args: argparse.Namespace,
                      killer: NodeKiller | None) -> tuple[dict, list[dict]]:
    """One elastic run on a fresh multi-node Cluster (torn down after it): the driver (fit) in a
    thread, node removals and additions on this (the main) thread."""
    import ray

    from elastic._internal.events import read_events

    cluster = node_cluster(WORLD + args.spare_nodes)
    box: dict[str, Any] = {}
    stop = killer.stop if killer is not None else threading.Event()

    def fit() -> None:
        try:
            box["result"] = elastic_trainer(cfg, spares).fit(quiet=True, raise_on_failure=False)
        except BaseException as exc:  # noqa: BLE001 - reported as the run's error
            box["raised"] = f"{type(exc).__name__}: {exc}"
        finally:
            stop.set()

    t0 = time.time()
    watchdog = threading.Timer(args.timeout, stop.set)
    watchdog.start()
    driver = threading.Thread(target=fit, name="driver", daemon=True)
    try:
        driver.start()
        if killer is not None:
            killer.cluster = cluster
            killer.run()
        driver.join(max(0.0, t0 + args.timeout - time.time()))
    finally:
        watchdog.cancel()
        stop.set()
        timed_out = driver.is_alive()
        ray.shutdown()
        cluster.shutdown()
    r = box.get("result")
    if r is None:
        error = f"timed out after {args.timeout:.0f}s" if timed_out else box.get("raised")
        return ({"ok": False, "error": error, "total_s": time.time() - t0, "summary": None},
                read_events(os.path.join(cfg["run_dir"], "ckpt")))
    return ({"ok": r.ok, "error": r.error, "total_s": time.time() - t0,
             "summary": r.summary() if hasattr(r, "summary") else None}, list(r.events))


def restarted(run_dir: str) -> int:
    """Registered training processes with generation > 0: for the TorchFT arms, replica restarts."""
    d = Path(run_dir) / "pids"
    return sum(int(p.read_text().split()[1]) > 0 for p in d.glob("*")) if d.exists() else 0


def sources(heals: list[dict]) -> str:
    """'peer 3, checkpoint 5': where restarted replicas that reached a quorum got their state."""
    n: dict[str, int] = {}
    for e in heals:
        n[e["source"]] = n.get(e["source"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in n.items()) or "—"


def errors(by_group: dict) -> str:
    """The distinct exception lines of the replica groups' logs, shortened."""
    seen = dict.fromkeys(e.split(". ")[0][:90] for errs in by_group.values() for e in errs)
    return " | ".join(seen) or "none"


def run_torchft(arm: str, cfg: dict, timeout: float, patched_hook: bool = False) -> dict:
    """One TorchFT run (peers_torchft) without a self-inflicted kill and with restarts enough for
    any schedule; the pids come from bench_common.register_pid in its loop."""
    import peers_torchft as pt

    kw = dict(kill_step=None, steps=cfg["steps"], every=cfg["every"], ranks=WORLD, restarts=cfg["restarts"],
              hidden=cfg["hidden"], patched_hook=patched_hook)
    if arm == "torchft":
        r = pt.run_torchft_arm(cfg["run_dir"], cfg["marker_dir"], timeout_s=timeout, **kw)
        return {"ok": bool(r["final_model"]) and not r["timed_out"] and all(rc == 0 for rc in r["rcs"]),
                "rcs": r["rcs"], "timed_out": r["timed_out"], "total_s": r["total_s"],
                "restarts": r["restarts"], "errors": r["errors"]}
    watchdog = threading.Timer(timeout, lambda: os.kill(os.getpid(), signal.SIGINT))
    watchdog.start()
    t0 = time.time()
    try:
        r = pt.run_raytrain_torchft_arm(cfg["run_dir"], cfg["marker_dir"], **kw)
    except KeyboardInterrupt:
        return {"ok": False, "error": f"timed out after {timeout:.0f}s", "timed_out": True, "total_s": time.time() - t0}
    finally:
        watchdog.cancel()
    return {"ok": r["ok"], "error": r["error"], "total_s": r["total_s"], "restarts": r["restarts"]}


def analyze(rows: list, kills: list[dict], arm: str, events: list[dict], steps: int) -> dict[str, Any]:
    done = max((s for s, *_ in rows), default=0)
    train_s = rows[-1][1] - rows[0][1] if len(rows) > 1 else float("nan")
    costs, lost = [], []
    # SIGTERM to an elastic rank: it trains on to the next agreed boundary, commits and leaves (its
    # worker_left event). The cost counts from the notice to a step beyond the newest step completed
    # before it left, so the wait for its successor is counted, not hidden by the steps it still took.
    left = sorted(e["time"] for e in events if e.get("event") == "worker_left"
                  and e.get("reason") == "preemption notice")
    for k in kills:
        cut = k.get("gone", k["time"])  # --fault node: the victim trained on until its process exited
        if k.get("fault") == "term" and arm.startswith("elastic"):
            cut = next((t for t in left if t >= k["time"]), cut)
        before = [r for r in rows if r[1] <= cut]
        if not before:
            continue
        newest = max(r[0] for r in before)
        after = [r for r in rows if r[1] > cut and r[0] > newest]
        if after:
            costs.append(after[0][1] - k["time"])
        gen = before[-1][2]
        nxt = [r for r in rows if r[1] > cut and r[2] != gen]
        if nxt:
            lost.append(max(0, newest - (nxt[0][0] - 1)))
    if arm.startswith("elastic"):
        fallbacks = len({e.get("generation") for e in events
                         if e.get("event") == "restored" and str(e.get("source", "")).startswith("checkpoint")
                         and e.get("generation", 0) > 0})
    elif arm in TORCHFT_ARMS:  # events: peers_torchft.read_heals, one per restarted group process
        fallbacks = len({e["quorum"] for e in events if e["source"] != "peer"})
    else:
        fallbacks = len({g for _, _, g, *_ in rows}) - 1
    return {"done": done, "finished": done >= steps, "train_s": train_s, "costs": costs, "lost": lost,
            "fallbacks": fallbacks}


# -- report ----------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def fmt(x: float | None, f: str = "{:.2f}") -> str:
    return "—" if x is None else f.format(x)


def report(runs: list[dict], args: argparse.Namespace) -> list[str]:
    lines = []
    free: dict[str, dict] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        fr = [r for r in runs if r["arm"] == arm and r["label"] == "free" and r["finished"]]
        if fr:  # the median of the arm's failure-free runs (one before and one after the schedules)
            free[arm] = {**fr[0], "train_s": statistics.median(r["train_s"] for r in fr), "finished": True}
    baseline = free.get("ddp", {}).get("final")
    what = {"kill": "SIGKILL of a random live rank",
            "term": f"SIGTERM (SIGKILL {args.grace:g} s later if still there) of a random live rank",
            "node": "loss of the Ray node hosting a random live rank (Cluster.remove_node, not graceful)"}[args.fault]
    lines.append(f"Churn: {WORLD} ranks, MLP hidden={args.hidden}, {args.steps} steps, checkpoint every "
                 f"{args.every}; {what} at exponential gaps (seeded, same for every arm)"
                 + (f"; {args.aim:.0%} of them aimed {0.4:g} s after the previous one (into its recovery)"
                    if args.aim else ""))
    if args.fault == "node":
        lines += node_notes(args)
        lines += [f"  {a}: {NODE_SKIP[a]}" for a in getattr(args, "node_skipped", [])]
    header = ["arm", "gap s", "seed", "nodes lost" if args.fault == "node" else "kills", "ETTR", "÷ torchrun",
              "cost median", "p90", "max", "lost", "ckpt fallbacks", "= DDP"]
    rows = []
    by = {(r["arm"], r["label"]): r for r in runs}
    for r in runs:
        if r["label"] == "free":
            continue
        f = free.get(r["arm"])
        ettr = (f["train_s"] / r["train_s"]) if f and r["finished"] and f["finished"] else None
        r["ettr"] = ettr
        tr = by.get(("torchrun", r["label"]))
        tr_ettr = (free["torchrun"]["train_s"] / tr["train_s"]) if tr and "torchrun" in free and tr["finished"] else None
        eq = "—"
        if baseline and r.get("final"):
            import torch

            a, b = torch.load(baseline), torch.load(r["final"])
            eq = "yes" if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else "NO"
        elif baseline:
            eq = "no final"
        r["equal"] = eq
        c = r["costs"]
        rows.append([r["arm"], r["gap"], r["seed"], len(r["kills"]), fmt(ettr),
                     fmt(ettr / tr_ettr if ettr and tr_ettr else None) if r["arm"] != "torchrun" else "",
                     fmt(statistics.median(c) if c else None), fmt(pct(c, 0.9)), fmt(max(c) if c else None),
                     sum(r["lost"]), r["fallbacks"], eq])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines.append(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("-+-".join("-" * w for w in widths))
    for row in rows:
        lines.append(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    lines.append("failure-free first->last step: " + ", ".join(f"{a} {r['train_s']:.1f}s" for a, r in free.items()))
    lines.append("ETTR = failure-free time / time under the schedule (first to last step, same arm); cost = kill "
                 "-> a completed step beyond the newest step before it")
    if any(r["arm"] in TORCHFT_ARMS for r in runs):
        lines.append("torchft arms: steps = committed by any replica group; ckpt fallbacks = quorums in which a "
                     "restarted group went on from ckpt.pt/scratch instead of healing from a live peer")
        for r in runs:
            if r["arm"] in TORCHFT_ARMS and r["label"] != "free":
                lines.append(f"  {r['arm']} {r['label']}: {r.get('restarted', '?')} replica restarts; state at a "
                             f"restart's first quorum: {sources(r.get('heals', []))}; ok {r.get('ok')}"
                             + (f"; exceptions logged: {errors(r['errors'])}" if r.get("errors") else ""))
    return lines


def node_notes(args: argparse.Namespace) -> list[str]:
    """The --fault node cluster and replacement policy, for the report's header."""
    return [
        f"Cluster per elastic run (failure-free runs too): a CPU-less head (driver, supervisor) + {WORLD} + "
        f"{args.spare_nodes} one-CPU nodes, all processes of this one {os.cpu_count()}-core host; ranks and "
        f"spares reserve a node each, a node's standby sits beside its rank and dies with it",
        f"Each removed node is replaced by a fresh one-CPU node {args.node_delay:g} s later (a spot "
        f"replacement: in a cloud it takes minutes against failures hours apart; this schedule compresses "
        f"time, so the delay is of the order of the mean gap and a burst of removals can use up the "
        f"{args.spare_nodes} free nodes for a while). Starting a node costs this host's CPU too.",
        "A removed node's Ray workers exit when they notice their raylet is gone (a second or two, training "
        "meanwhile): cost = removal -> a completed step beyond the newest step completed before the victim's "
        "process exited. Ray's GCS declares a removed node dead only when its health checks fail; the head "
        f"runs with {', '.join(f'{k}={v}' for k, v in NODE_HEALTH_CHECKS.items())} (about 3 s; Ray's defaults: "
        "about 15 s), as an operator of a spot cluster sets them.",
    ]


def plot(runs: list[dict], path: Path) -> bool:
    panels = []
    for label in dict.fromkeys(r["label"] for r in runs if r["label"] != "free"):
        rs = [r for r in runs if r["label"] == label]
        for r in rs:
            r["recoveries"] = [{"kill_time": k["time"], "kill_step": max((s for s, t, _ in r["steps"] if t <= k["time"]),
                                                                          default=0)} for k in r["kills"]]
        panels.append((f"schedule {label}", rs))
    return bc.plot_step_panels(panels[:4], path, origin=lambda r: r["steps"][0][1], xlabel="seconds since first step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torchrun-worker", help=argparse.SUPPRESS)
    ap.add_argument("--arms", nargs="+", default=["ddp", "torchrun", "torchft", "elastic", "elastic+spare",
                                                  "raytrain-torchft"],
                    choices=["ddp", "torchrun", "elastic", "elastic+spare", *TORCHFT_ARMS])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--gaps", nargs="+", type=float, default=[8.0, 30.0])
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=192, help="MLP width (192: about 200k parameters)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--torchft-patched-hook", action="store_true",
                    help="TorchFT arms: peers_torchft's comm hook that honours a failed allreduce (torchft 0.2's "
                         "own hook asserts, so a kill during the survivor's allreduce kills the survivor too)")
    ap.add_argument("--fault", choices=["kill", "term", "node"], default="kill",
                    help="kill: SIGKILL; term: SIGTERM (a preemption notice), SIGKILL after --grace s; node: "
                         "Cluster.remove_node of the node hosting the rank (elastic arms on a multi-node Cluster)")
    ap.add_argument("--spare-nodes", type=int, default=2,
                    help="--fault node: one-CPU nodes beyond the ranks' (room for spares and replacements)")
    ap.add_argument("--node-delay", type=float, default=10.0,
                    help="--fault node: seconds after a removal until a fresh node replaces it")
    ap.add_argument("--grace", type=float, default=5.0)
    ap.add_argument("--aim", type=float, default=0.0,
                    help="share of the faults moved to 0.4 s after the previous one (into its recovery)")
    ap.add_argument("--out-dir", default="bench_out")
    args = ap.parse_args()
    if args.torchrun_worker:
        bp.torch_worker(json.loads(Path(args.torchrun_worker).read_text()))
        return
    root = tempfile.mkdtemp(prefix="bench_churn_")
    runs: list[dict] = []
    before = bc.machine_note()
    if args.fault == "node":
        args.node_skipped = [a for a in args.arms if a in NODE_SKIP]
        for a in args.node_skipped:
            print(f"skipping {a} under --fault node: {NODE_SKIP[a]}", flush=True)
        args.arms = [a for a in args.arms if a in NODE_ARMS]
    arms, missing = bp.available_arms(args.arms)
    for a, why in missing.items():
        print(f"skipping {a}: {why}", flush=True)
    # --fault node: each elastic run brings up its own multi-node cluster (run_elastic_nodes).
    needs_ray = args.fault != "node" and any(a not in ("ddp", "torchrun", "torchft") for a in arms)
    if needs_ray:
        import ray

        ray.init(num_cpus=WORLD + 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    # Arms alternate within each schedule, and each arm's failure-free run is taken before and after
    # all schedules (its median is the ETTR's numerator): drift on a shared machine hits every arm alike.
    try:
        for arm in arms:
            runs.append(run_arm(arm, root, args, None, "free"))
        horizon = 4 * max(r["train_s"] for r in runs if r["finished"]) + 60
        for gap in args.gaps:
            for seed in args.seeds:
                print(f"schedule: gap {gap:g} s, seed {seed}", flush=True)
                for arm in arms:
                    if arm == "ddp":
                        continue
                    r = run_arm(arm, root, args, schedule(seed, gap, horizon), f"g{gap:g}s{seed}")
                    r.update(gap=gap, seed=seed)
                    runs.append(r)
        for arm in arms:
            runs.append(run_arm(arm, root, args, None, "free"))
    finally:
        if needs_ray:
            ray.shutdown()
    lines = report(runs, args)
    print("\n" + "\n".join(lines))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "churn.txt").write_text("\n".join(lines) + "\n")
    bc.write_json(out / "churn.json", {"machine_before": before, "machine_after": bc.machine_note(),
                                       "args": vars(args), "runs": runs})
    if plot(runs, out / "churn.png"):
        print(f"plot: {out / 'churn.png'}")


if __name__ == "__main__":
    main()
