"""The TorchFT arm of the peers benchmark (issue 6): bench_common's job under torchft 0.2.0.

How TorchFT is driven here (as its README / train_ddp.py run it):
  * one lighthouse, the `torchft_lighthouse` binary shipped in the wheel
    (`--min_replicas M --quorum_tick_ms 100 --join_timeout_ms 10000`, heartbeat timeout 5 s by default);
  * one replica group per rank, each its own `torchrun --nnodes 1 --nproc_per_node 1 --max-restarts N`
    with its own store (--master_port), REPLICA_GROUP_ID / NUM_REPLICA_GROUPS / TORCHFT_LIGHTHOUSE in
    its environment, its own process session (the whole tree is SIGKILLed on cleanup);
  * in each group: `Manager(pg=ProcessGroupGloo(timeout=5s), checkpoint_transport=PGTransport(...),
    min_replica_size=M, replica_id=f"tf_{group}", timeout=30s)`, torchft's `DistributedDataParallel`
    and `OptimizerWrapper`; `zero_grad()` starts the quorum, `step()` steps only if `should_commit()`.
    A replica group that torchrun restarts heals from the live group (torchft's live checkpoint
    transfer); the periodic checkpoint (every C steps, rank 0 of group 0, model + optimizer +
    `manager.state_dict()` as torchft's docs require) is only read at a process start, i.e. for a
    cold restart when no live peer is left.

Same job as every other arm: global batch 64 per committed step, split over the replicas that take
part in that step's quorum (rank = `manager.participating_rank()`, world =
`manager.num_participants()`), so a survivor that trains alone still computes the whole global
batch. That needs the quorum before the forward pass, hence `use_async_quorum=False` (a healed
replica then also takes part in the very step it healed in). The step index is
`manager.current_step()` (committed steps), so a step that does not commit is recomputed with the
same data.

The fault: replica group 1 SIGKILLs itself through `elastic.chaos.faults.maybe_inject` (fire-once
marker) at committed step --kill-step, either at the top of the step, before its quorum request
(`--kill-phase step`, like the other arms), or after it joined that step's quorum
(`--kill-phase quorum`: the survivor's gradient allreduce then meets a dead peer).

With torchft 0.2.0 the second case kills the survivor too: `_ManagedWork.wait()` (manager.py)
catches the gloo "connection reset", reports it to the manager and returns False *before*
`_set_future_callback()` has given the managed future its `_fut`, and `DistributedDataParallel.
_comm_hook` (ddp.py) ignores that return value and does `assert fut._fut` → AssertionError in
backward. `--patched-hook` runs the same arm with a comm hook that honours the return value (a
failed allreduce yields a zeroed bucket; the manager already recorded the error, so
`should_commit()` returns False and the step is recomputed in the next quorum).

Rank 0 of group 0 writes bench_common's steps.log (generation = torchft quorum id) and every group
writes attempts-G.log (step, time, quorum id, participants, committed). analyze_run gives recovery
(kill → first step committed in the next quorum), lost steps and steady-state step time; "healed"
is kill → first committed step with every replica group taking part again. Recovery cannot be
shorter than the lighthouse's --heartbeat_timeout_ms: no new quorum forms while the dead replica
still counts as healthy (its last heartbeat is younger than the timeout), whether or not the
restarted group has already joined.

Run (2 ranks, 120 steps, kill at 50; prints one line per run and a summary):
    .venv/bin/python scripts/peers_torchft.py                       # failure-free + kill at top of step
    .venv/bin/python scripts/peers_torchft.py --kill-phase quorum   # reproduces the AssertionError
    .venv/bin/python scripts/peers_torchft.py --kill-phase quorum --patched-hook
    .venv/bin/python scripts/peers_torchft.py --min-replicas 2      # survivor waits for its peer
    add --ddp for bench_peers' plain-DDP baseline (torchrun, 2 ranks) to compare step time against.
Needs `pip install torchft==0.2.0` (installs next to torch 2.13 without replacing it).
"""

from __future__ import annotations

import time

T_START = time.time()  # the worker's process start (before torch is imported), for phases.log

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_common as bc  # noqa: E402

ATTEMPTS = "attempts-{}.log"
HEALS = "heals.log"  # one line per restarted group: group restart source step-before step-after quorum time


# -- the replica-group worker (one process per group, under torchrun) -------------------------------
def tf_worker(cfg: dict) -> None:
    """A replica group's process under torchrun (its group and restart count from the environment)."""
    tf_loop(cfg, group=int(os.environ["REPLICA_GROUP_ID"]), n_groups=int(os.environ["NUM_REPLICA_GROUPS"]),
            restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), t_start=T_START)
    os._exit(0)  # tearing down gloo/the Rust runtime at interpreter exit can hang


def raytrain_worker(cfg: dict) -> None:
    """A replica group's worker under Ray Train's TorchftConfig (one worker per group; Ray Train
    sets TORCHFT_LIGHTHOUSE and the group's MASTER_ADDR/PORT, and replaces a failed group alone)."""
    t_start = time.time()
    import ray.train

    ctx = ray.train.get_context()
    group, n_groups = ctx.get_world_rank(), ctx.get_world_size()
    starts = Path(cfg["run_dir"], f"starts-{group}")  # Ray Train has no restart count: count them
    with open(starts, "a") as f:
        f.write("x")
    tf_loop(cfg, group=group, n_groups=n_groups, restart=starts.stat().st_size - 1, t_start=t_start)


def tf_loop(cfg: dict, *, group: int, n_groups: int, restart: int, t_start: float) -> None:
    import torch
    from torchft import DistributedDataParallel, Manager, ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    from elastic.chaos.faults import maybe_inject, parse_faults

    torch.set_num_threads(1)
    run_dir = cfg["run_dir"]
    bc.register_pid(run_dir, group, restart)  # what bench_churn's failure schedule picks victims from
    x, y = bc.make_data()
    model = bc.make_model(cfg.get("hidden") or bc.HIDDEN)
    opt = bc.make_optimizer(model)

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    pg = ProcessGroupGloo(timeout=timedelta(seconds=cfg["pg_timeout_s"]))
    transport = PGTransport(pg, timeout=timedelta(seconds=cfg["transport_timeout_s"]), device=torch.device("cpu"))
    peer_heals: list[float] = []  # the manager fetches a live peer's state only when it heals this group
    _recv = transport.recv_checkpoint

    def recv_checkpoint(*a: Any, **k: Any) -> Any:
        peer_heals.append(time.time())
        return _recv(*a, **k)

    transport.recv_checkpoint = recv_checkpoint  # type: ignore[method-assign]
    manager = Manager(pg=pg, min_replica_size=cfg["min_replicas"], load_state_dict=load_state_dict,
                      state_dict=state_dict, replica_id=f"tf_{group}", rank=0, world_size=1, timeout=timedelta(seconds=cfg["timeout_s"]),
                      checkpoint_transport=transport, use_async_quorum=False,
                      init_sync=False)  # every group builds the same seeded model: nothing to sync at step 0
    t_setup = time.time()
    ckpt = os.path.join(run_dir, "ckpt.pt")
    from_ckpt = os.path.exists(ckpt)
    if from_ckpt:  # cold-restart path; a live peer further ahead heals us anyway
        sd = torch.load(ckpt)
        load_state_dict(sd["user"])
        manager.load_state_dict(sd["torchft"])
    ddp = (_make_safe_ddp() if cfg["patched_hook"] else DistributedDataParallel)(manager, model)
    topt = _QuorumFirst(manager, opt)
    if restart == 0:  # both groups ask for the first quorum together (else group 0 may start alone)
        _barrier(run_dir, group, n_groups, timeout=120.0)

    def save(step: int) -> float:  # synchronous torch.save on rank 0 of group 0, like the torchrun arm
        if group != 0:
            return 0.0
        t0 = time.perf_counter()
        with open(ckpt + ".tmp", "wb") as f:
            torch.save({"user": state_dict(), "torchft": manager.state_dict(), "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(ckpt + ".tmp", ckpt)
        return time.perf_counter() - t0

    sampler, faults = bc.make_sampler(), parse_faults(cfg["faults"])
    log = bc.StepLog(run_dir, group == 0)
    att = open(os.path.join(run_dir, ATTEMPTS.format(group)), "a", buffering=1)
    first = True
    while manager.current_step() < cfg["steps"]:
        step = manager.current_step()
        if cfg["kill_phase"] == "step":
            maybe_inject(faults, step=step, rank=group, marker_dir=cfg["marker_dir"])
        before = manager.current_step()
        manager.start_quorum()  # synchronous (use_async_quorum=False): heals this group if it is behind
        step = manager.current_step()
        if first and restart > 0:  # where a restarted group's state came from (HEALS, read_heals)
            source = "peer" if peer_heals else ("checkpoint" if from_ckpt else "scratch")
            with open(os.path.join(run_dir, HEALS), "a") as f:
                f.write(f"{group} {restart} {source} {before} {step} {manager._quorum_id} {time.time():.6f}\n")
        if step >= cfg["steps"]:
            break
        rank, world = manager.participating_rank(), manager.num_participants()
        if rank is None or world < 1:  # not in this quorum: compute something; the allreduce zeroes it
            rank, world = 0, 1
        if first:
            with open(os.path.join(run_dir, "phases.log"), "a") as f:
                f.write(f"{restart} {group} {t_start:.6f} {t_setup:.6f} {time.time():.6f} {time.time():.6f}\n")
            first = False
        if cfg["kill_phase"] == "quorum":
            maybe_inject(faults, step=step, rank=group, marker_dir=cfg["marker_dir"])
        bc.train_step(ddp, topt, x, y, sampler, step, rank, world)
        done = manager.current_step()
        committed = done == step + 1
        stall = save(done) if committed and done % cfg["every"] == 0 else 0.0
        if committed:
            log.step(done, manager._quorum_id, 0.0, stall)
        att.write(f"{step} {time.time():.6f} {manager._quorum_id} {world} {int(committed)} {restart}\n")
    log.close()
    att.close()
    if group == 0:
        torch.save(model.state_dict(), os.path.join(run_dir, "final.pt"))
    manager.shutdown(wait=False)


class _QuorumFirst:
    """torchft's OptimizerWrapper minus the quorum in zero_grad(): the loop starts the quorum itself
    before choosing its share of the batch, and bench_common.train_step then calls zero_grad() and
    step(); step() steps the inner optimizer only if manager.should_commit()."""

    def __init__(self, manager: Any, optim: Any) -> None:
        from torchft.optim import OptimizerWrapper

        self._w = OptimizerWrapper(manager, optim)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._w.optim.zero_grad(set_to_none)

    def step(self) -> None:
        self._w.step()


def _safe_hook(state, bucket):  # noqa: ANN001 - DDP rejects a bucket annotation other than dist.GradBucket
    """torchft's DDP comm hook, except that a failed allreduce (work.wait() is False: the manager
    has recorded the error) yields a zeroed bucket instead of `assert fut._fut`."""
    import torch

    work = state.allreduce(bucket.buffer())
    ok = work.wait()
    inner = getattr(work.get_future(), "_fut", None)  # _DummyWork (manager already errored) has none
    if ok and inner is not None:
        return inner
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer().zero_())
    return fut


def _make_safe_ddp() -> type:
    from torchft import DistributedDataParallel

    class SafeHookDDP(DistributedDataParallel):
        _comm_hook = staticmethod(_safe_hook)

    return SafeHookDDP


def _barrier(run_dir: str, group: int, n: int, timeout: float) -> None:
    Path(run_dir, f"ready-{group}").touch()
    t0 = time.time()
    while not all(Path(run_dir, f"ready-{g}").exists() for g in range(n)):
        if time.time() - t0 > timeout:
            raise TimeoutError("replica groups did not all start")
        time.sleep(0.05)


# -- the driver --------------------------------------------------------------------------------------
_free_port, _kill_tree = bc.free_port, bc.kill_tree


def _wait_port(port: int, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"lighthouse did not listen on {port}")


def _exceptions(log_path: Path) -> list[str]:
    """The exception lines ('FooError: ...') a group's log holds, in order, without repeats."""
    if not log_path.exists():
        return []
    seen: list[str] = []
    for line in log_path.read_text(errors="replace").splitlines():
        m = re.match(r"^\s*(?:\[[^\]]*\]:?\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)(?::.*)?)$", line)
        if m and m.group(1) not in seen:
            seen.append(m.group(1)[:300])
    return seen


def read_attempts(run_dir: str | os.PathLike, group: int) -> list[tuple[int, float, int, int, int, int]]:
    p = Path(run_dir, ATTEMPTS.format(group))
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        f = line.split()
        if len(f) == 6:
            out.append((int(f[0]), float(f[1]), int(f[2]), int(f[3]), int(f[4]), int(f[5])))
    return out


def read_heals(run_dir: str | os.PathLike) -> list[dict]:
    """Per restarted group process, where its state came from in its first quorum: "peer" (healed
    from a live replica group by torchft's checkpoint transport), "checkpoint" (no live group was
    ahead: it went on from ckpt.pt) or "scratch" (no checkpoint yet)."""
    p = Path(run_dir, HEALS)
    out = []
    for line in p.read_text().splitlines() if p.exists() else []:
        f = line.split()
        if len(f) == 7:
            out.append({"group": int(f[0]), "restart": int(f[1]), "source": f[2], "step_before": int(f[3]),
                        "step": int(f[4]), "quorum": int(f[5]), "time": float(f[6])})
    return out


def job_steps(run_dir: str | os.PathLike, groups: int) -> list[tuple[int, float, int, float, float]]:
    """The job's progress as bench_common.read_steps rows (step, time, quorum id, 0, 0): every step
    any replica group committed, once per (step, quorum) at its earliest time. Unlike group 0's
    steps.log, it goes on while group 0 is down and the survivor trains alone."""
    seen: dict[tuple[int, int], float] = {}
    for g in range(groups):
        for step, t, q, _world, committed, _restart in read_attempts(run_dir, g):
            if committed:
                key = (step + 1, q)
                seen[key] = min(t, seen.get(key, t))
    return sorted(((s, t, q, 0.0, 0.0) for (s, q), t in seen.items()), key=lambda r: (r[1], r[0]))


def run_torchft_arm(run_dir: str, marker_dir: str, *, kill_step: int | None, steps: int, every: int,
                    ranks: int = 2, timeout_s: float = 180.0, min_replicas: int = 1, heartbeat_ms: int = 5000,
                    kill_phase: str = "step", patched_hook: bool = False, restarts: int = 3,
                    hidden: int | None = None) -> dict:
    """One TorchFT run: a lighthouse plus `ranks` replica groups, each under its own torchrun.

    kill_step None runs failure-free. Returns analyze_run's RunAnalysis ("analysis"), the path of
    group 0's final parameters ("final_model", None if it did not finish), "healed" (kill → first
    committed step with all groups again), exit codes, timeout flag and the exceptions in the logs.
    """
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    cfg = {"steps": steps, "every": every, "run_dir": run_dir, "marker_dir": marker_dir,
           "faults": [] if kill_step is None else [{"kind": "sigkill", "step": kill_step, "rank": 1}],
           "kill_phase": kill_phase, "patched_hook": patched_hook, "min_replicas": min_replicas,
           "pg_timeout_s": 5.0, "transport_timeout_s": 10.0, "timeout_s": 30.0, "hidden": hidden}
    cfg_path = os.path.join(run_dir, "cfg.json")
    Path(cfg_path).write_text(json.dumps(cfg))
    lh_port = _free_port()
    lh_bin = shutil.which("torchft_lighthouse", path=os.path.dirname(sys.executable)) or "torchft_lighthouse"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NUM_REPLICA_GROUPS": str(ranks),
           "TORCHFT_LIGHTHOUSE": f"http://localhost:{lh_port}", "RUST_BACKTRACE": "1"}
    procs: list[subprocess.Popen] = []
    logs = []
    t0 = time.time()
    rcs: list[int | None] = []
    timed_out = False
    try:
        lh_log = open(os.path.join(run_dir, "lighthouse.log"), "w")
        logs.append(lh_log)
        lh = subprocess.Popen([lh_bin, "--min_replicas", str(min_replicas), "--quorum_tick_ms", "100",
                               "--join_timeout_ms", "10000", "--heartbeat_timeout_ms", str(heartbeat_ms),
                               "--bind", f"[::]:{lh_port}"], env=env, stdout=lh_log, stderr=subprocess.STDOUT,
                              start_new_session=True)
        procs.append(lh)
        _wait_port(lh_port, 30.0)
        groups = []
        for g in range(ranks):
            out = open(os.path.join(run_dir, f"group{g}.log"), "w")
            logs.append(out)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1",
                   f"--max-restarts={restarts}", f"--master-port={_free_port()}", "--monitor-interval=0.1",
                   os.path.abspath(__file__), "--worker", cfg_path]
            p = subprocess.Popen(cmd, env={**env, "REPLICA_GROUP_ID": str(g)}, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            groups.append(p)
        deadline = t0 + timeout_s
        for p in groups:
            try:
                rcs.append(p.wait(timeout=max(0.1, deadline - time.time())))
            except subprocess.TimeoutExpired:
                rcs.append(None)
                timed_out = True
    finally:
        for p in procs:
            _kill_tree(p)
        for f in logs:
            f.close()
    total = time.time() - t0
    a = bc.analyze_run(run_dir, marker_dir)
    kills = bc.read_kills(marker_dir)
    healed = None
    if kills:
        kt = kills[0][2]
        att0 = read_attempts(run_dir, 0)
        q_kill = max((r[2] for r in att0 if r[1] <= kt), default=-1)  # the quorum the victim died in
        back = [r for r in att0 if r[1] > kt and r[2] > q_kill and r[4] and r[3] == ranks]
        healed = {"seconds": back[0][1] - kt, "step": back[0][0] + 1} if back else None
    final = os.path.join(run_dir, "final.pt")
    return {"analysis": a, "final_model": final if os.path.exists(final) else None, "healed": healed,
            "rcs": rcs, "timed_out": timed_out, "total_s": total, "kills": kills,
            "restarts": {g: sorted({r[5] for r in read_attempts(run_dir, g)}) for g in range(ranks)},
            "heals": read_heals(run_dir),
            "errors": {g: _exceptions(Path(run_dir, f"group{g}.log")) for g in range(ranks)}}


def run_raytrain_torchft_arm(run_dir: str, marker_dir: str, *, kill_step: int | None, steps: int, every: int,
                             ranks: int = 2, min_replicas: int = 1, heartbeat_ms: int = 5000, restarts: int = 3,
                             hidden: int | None = None, patched_hook: bool = False) -> dict:
    """One TorchFT run under Ray Train v2's TorchftConfig: Ray Train starts the lighthouse (an actor),
    one worker per replica group, and on a failure restarts only the failed group, which heals from
    the live one. Same loop and fault as run_torchft_arm. Needs a running (or local) Ray."""
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer
    from ray.train.v2.torch.torchft_config import TorchftConfig

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    cfg = {"steps": steps, "every": every, "run_dir": run_dir, "marker_dir": marker_dir,
           "faults": [] if kill_step is None else [{"kind": "sigkill", "step": kill_step, "rank": 1}],
           "kill_phase": "step", "patched_hook": patched_hook, "min_replicas": min_replicas,
           "pg_timeout_s": 5.0, "transport_timeout_s": 10.0, "timeout_s": 30.0, "hidden": hidden}
    cloudpickle.register_pickle_by_value(bc)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    t0 = time.time()
    trainer = TorchTrainer(
        raytrain_worker, train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=ranks, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchftConfig(lighthouse_kwargs={"min_replicas": min_replicas, "quorum_tick_ms": 100,
                                                      "join_timeout_ms": 10000, "heartbeat_timeout_ms": heartbeat_ms},
                                   backend="gloo"),
        run_config=ray.train.RunConfig(name=f"rtft-{os.getpid()}-{int(t0)}", storage_path=os.path.join(run_dir, "rt"),
                                       failure_config=ray.train.FailureConfig(max_failures=restarts)))
    try:
        trainer.fit()
        ok, err = True, None
    except Exception as exc:  # noqa: BLE001 - a failed peer is a row in the table, not a crash
        ok, err = False, f"{type(exc).__name__}: {str(exc)[:300]}"
    total = time.time() - t0
    final = os.path.join(run_dir, "final.pt")
    return {"ok": ok and os.path.exists(final), "error": err, "total_s": total,
            "final_model": final if os.path.exists(final) else None,
            "restarts": {g: sorted({r[5] for r in read_attempts(run_dir, g)}) for g in range(ranks)},
            "heals": read_heals(run_dir)}


def _equal(a: str | None, b: str | None) -> tuple[bool | None, float | None]:
    import torch

    if not a or not b:
        return None, None
    sa, sb = torch.load(a), torch.load(b)
    eq = all(torch.equal(sa[k], sb[k]) for k in sa)
    return eq, max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def _ddp_final(run_dir: str) -> str | None:
    """bench_peers' DDP worker leaves its last synchronous checkpoint (step = steps when C | steps)."""
    import torch

    p = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(p):
        return None
    out = os.path.join(run_dir, "final.pt")
    torch.save(torch.load(p)["model"], out)
    return out


def _line(label: str, r: dict, steps: int) -> str:
    a = r["analysis"]
    done = max((s for s, _, _ in a.steps), default=0)
    s = f"  {label:28} {done}/{steps} steps, total {r['total_s']:.1f}s, step {bc.med(a.step_times) or 0:.4f}s"
    if a.recoveries:
        rec = a.recoveries[0]
        s += f", recovery {rec.seconds:.2f}s (first step {rec.first_new_step}), lost {rec.lost_steps}"
    if r.get("healed"):
        s += f", healed {r['healed']['seconds']:.2f}s (step {r['healed']['step']})"
    if r.get("timed_out"):
        s += " TIMED OUT"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--kill-step", type=int, default=50)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2, help="replica groups (one rank each)")
    ap.add_argument("--min-replicas", type=int, default=1,
                    help="lighthouse --min_replicas and Manager min_replica_size (1: the survivor goes on alone)")
    ap.add_argument("--heartbeat-ms", type=int, default=5000, help="lighthouse --heartbeat_timeout_ms")
    ap.add_argument("--kill-phase", choices=["step", "quorum"], default="step")
    ap.add_argument("--patched-hook", action="store_true", help="DDP comm hook that honours a failed allreduce")
    ap.add_argument("--no-baseline", action="store_true", help="skip the failure-free TorchFT run")
    ap.add_argument("--baseline-model", help="with --no-baseline: a failure-free run's final.pt to compare with")
    ap.add_argument("--ddp", action="store_true", help="also run bench_peers' plain DDP arm for step time")
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.worker:
        tf_worker(json.loads(Path(args.worker).read_text()))
        return
    try:
        import torchft  # noqa: F401
    except ImportError as exc:
        sys.exit(f"torchft is not importable ({exc}); pip install torchft==0.2.0")
    root = tempfile.mkdtemp(prefix="peers_torchft_")
    common = dict(steps=args.steps, every=args.every, ranks=args.ranks, timeout_s=args.timeout,
                  min_replicas=args.min_replicas, heartbeat_ms=args.heartbeat_ms, kill_phase=args.kill_phase,
                  patched_hook=args.patched_hook)
    print(f"TorchFT arm: {args.ranks} replica groups, {args.steps} steps, C={args.every}, min_replicas="
          f"{args.min_replicas}, heartbeat {args.heartbeat_ms} ms, kill of group 1 at step {args.kill_step} "
          f"({args.kill_phase}), {'patched' if args.patched_hook else 'stock'} comm hook; runs under {root}",
          flush=True)
    runs: dict[str, Any] = {}
    ddp_step = ddp_final = None
    if args.ddp:
        import bench_peers as bp

        d = tempfile.mkdtemp(prefix="ddp_", dir=root)
        cfg = {"steps": args.steps, "every": args.every, "run_dir": d, "marker_dir": os.path.join(d, "markers"),
               "restarts": 0, "faults": []}
        info = bp.run_torchrun(cfg, restarts=0, fresh_store=True, timeout=args.timeout)
        da = bc.analyze_run(d)
        ddp_step, ddp_final = bc.med(da.step_times), _ddp_final(d)
        print(f"  {'plain DDP (bench_peers)':28} total {info['total_s']:.1f}s, step {ddp_step or 0:.4f}s", flush=True)
    if not args.no_baseline:
        d = tempfile.mkdtemp(prefix="tf_nokill_", dir=root)
        runs["no_kill"] = run_torchft_arm(d, os.path.join(d, "markers"), kill_step=None, **common)
        print(_line("torchft, no kill", runs["no_kill"], args.steps), flush=True)
    d = tempfile.mkdtemp(prefix="tf_kill_", dir=root)
    runs["kill"] = run_torchft_arm(d, os.path.join(d, "markers"), kill_step=args.kill_step, **common)
    print(_line("torchft, kill", runs["kill"], args.steps), flush=True)

    k = runs["kill"]
    base = runs.get("no_kill")
    eq, diff = _equal(k["final_model"], base["final_model"] if base else args.baseline_model)
    eq_ddp, diff_ddp = _equal(base["final_model"] if base else None, ddp_final)
    a = k["analysis"]
    rec = a.recoveries[0] if a.recoveries else None
    tf_step = bc.med(base["analysis"].step_times) if base else bc.med(a.step_times)
    print("\nSummary")
    print(f"  recovery s (kill → first step in the next quorum): {rec.seconds:.2f}" if rec else
          "  recovery: none (no step committed after the kill)")
    print(f"  healed s (kill → first step with all {args.ranks} groups): "
          + (f"{k['healed']['seconds']:.2f} at step {k['healed']['step']}" if k["healed"] else "never"))
    print(f"  lost steps: {rec.lost_steps if rec else '—'}")
    print(f"  median step s: torchft {tf_step or 0:.4f}" + (f", plain DDP {ddp_step:.4f} (÷ DDP "
                                                            f"{tf_step / ddp_step:.2f}×)" if ddp_step and tf_step else ""))
    print(f"  final parameters torch.equal to the failure-free run: {eq}"
          + (f" (max |Δ| {diff:.3g})" if diff is not None else ""))
    if eq_ddp is not None:
        print(f"  failure-free torchft torch.equal to plain DDP: {eq_ddp} (max |Δ| {diff_ddp:.3g})")
    print(f"  exit codes {k['rcs']}, restarts seen per group {k['restarts']}, timed out {k['timed_out']}")
    for g, errs in k["errors"].items():
        if errs:
            print(f"  exceptions logged by group {g}: " + " | ".join(errs))
    if args.out:
        bc.write_json(args.out, {"args": vars(args), "ddp_step_s": ddp_step, "equal": eq, "max_abs_diff": diff,
                                 "runs": {n: {**r, "analysis": r["analysis"].__dict__} for n, r in runs.items()}})


if __name__ == "__main__":
    main()
