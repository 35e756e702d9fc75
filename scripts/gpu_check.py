"""GPU check: elastic's worker side on every visible GPU, in plain processes (no Ray), one pass/fail line.

    python scripts/gpu_check.py            # about 1-3 minutes; on a machine without a GPU it runs the
                                           # same scenarios on CPU and says what it skipped

It drives the worker-side pieces a worker actor runs (process groups, the control plane, restore,
commit, snapshots, checkpoints) from a small supervisor in this process, so it needs torch (>= 2.6)
and this repository, not Ray. Scenarios, by what the machine has:

- no GPU:    2 ranks on gloo (CPU): a rank SIGKILLed, a rank frozen (SIGSTOP).
- 1 GPU:     1 rank on NCCL (train, pinned snapshot, checkpoint); 2 ranks sharing the GPU over gloo
             with CUDA tensors: a rank SIGKILLed, a rank frozen.
- >= 2 GPUs: NCCL across min(GPUs, 4) ranks: a rank SIGKILLed, a rank frozen (the survivors'
             communicator is aborted, they keep their process and snapshot, the next generation
             builds a fresh communicator).

Each fault scenario checks: the training group is never used by the runtime (it is replaced, after
DDP took its own reference, by an object that fails on any call), snapshots of CUDA state are pinned,
survivors keep their process, recovery time (fault -> first step of the new group), lost steps
(<= 1), and that the final parameters equal those of the same run without the fault.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

STEPS = 30
FAULT_STEP = 12


@dataclass(frozen=True)
class Scenario:
    name: str
    world: int
    backend: str
    device: str  # "cpu" or "cuda"
    fault: str | None  # None, "kill", "freeze"
    gpus: tuple[int, ...] = ()  # GPU index of each rank slot (shared ones repeat)
    timeout_s: float = 6.0

    def device_of(self, slot: int) -> str:
        if self.device == "cpu":
            return "cpu"
        return f"cuda:{self.gpus[slot % len(self.gpus)]}"


# -- the rank side (a spawned process: what a worker actor does, without Ray) ----------------------
def _model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(device)


class _TrainingGroupOnly:
    """Replaces the generation's training group for the runtime after DDP took its own reference:
    any runtime collective on it fails the check."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in ("rank", "size"):
            return getattr(self._inner, name)
        raise AssertionError(f"the runtime called {name}() on the training group")


def rank_main(slot: int, sc: Scenario, cmds: Any, results: Any, run_dir: str) -> None:
    torch.set_num_threads(1)
    import elastic
    from elastic.config import CheckpointConfig, FailureConfig, RunConfig
    from elastic._internal.worker.generation import Generation
    from elastic._internal.worker.groups import connect
    from elastic._internal.protocol import Assignment
    from elastic._internal.worker.services import Services
    from elastic._internal.worker.vote import PauseRequested

    device = sc.device_of(slot)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    run = RunConfig(checkpoint=CheckpointConfig(uri=run_dir, every_n_steps=10),
                    failure=FailureConfig(collective_timeout_s=sc.timeout_s))
    services = Services(run)
    while True:
        cmd = cmds.get()
        if cmd is None:
            return
        a = Assignment(**cmd)
        os.environ.update({"RANK": str(a.rank), "WORLD_SIZE": str(a.world_size)})
        groups = gen = None
        step = -1
        try:
            groups = connect(a, services.clock)
            gen = Generation(groups, torch.device(device), services)
            model = _model(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            state = elastic.TrainState(model=model, optimizer=opt)
            gen.restore(state)
            ddp = gen.prepare_model(model)
            groups.train = _TrainingGroupOnly(groups.train)
            first = None
            while state.step < STEPS:
                step = state.step
                if sc.fault and a.generation == 0 and a.rank == 1 and step == FAULT_STEP:
                    os.kill(os.getpid(), signal.SIGKILL if sc.fault == "kill" else signal.SIGSTOP)
                g = torch.Generator().manual_seed(1000 * step + a.rank)
                x = torch.randn(16, 32, generator=g).to(device)
                loss = ddp(x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                gen.commit(state)
                if first is None:
                    first = time.time()
            gen.finish()
            pinned = all(t.is_pinned() for _, t in services.snapshot.tensors) if device.startswith("cuda") else None
            params = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            results.put(("done", slot, {"pid": os.getpid(), "first_step_at": first, "pinned": pinned,
                                        "events": services.board.take_events()}, params))
        except PauseRequested:
            results.put(("parked", slot, {"pid": os.getpid(), "step": step}, None))
        except BaseException as exc:  # noqa: BLE001 - a broken group is an outcome here
            if groups is not None:
                try:
                    groups.abort()
                except Exception:  # noqa: BLE001
                    pass
            results.put(("broken", slot, {"pid": os.getpid(), "step": step, "error": f"{type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0] if str(exc) else ''}",
                                          "trace": traceback.format_exc()[-1500:]}, None))
        finally:
            if gen is not None:
                gen.release()
            if groups is not None:
                try:
                    groups.destroy()
                except Exception:  # noqa: BLE001
                    pass


# -- the supervisor side (this process) ------------------------------------------------------------
class Slot:
    def __init__(self, ctx: Any, slot: int, sc: Scenario, results: Any, run_dir: str):
        self.slot = slot
        self.cmds = ctx.Queue()
        self.proc = ctx.Process(target=rank_main, args=(slot, sc, self.cmds, results, run_dir), daemon=True)
        self.proc.start()


def run_scenario(sc: Scenario, deadline: float) -> dict[str, Any]:
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    run_dir = tempfile.mkdtemp(prefix=f"gpu-check-{sc.name}-")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    prefix = os.urandom(8).hex() + "/"
    slots = [Slot(ctx, i, sc, results, f"file://{run_dir}") for i in range(sc.world)]
    out: dict[str, Any] = {"scenario": sc.name}

    def assign(generation: int, members: list[Slot]) -> None:
        for rank, s in enumerate(members):
            s.cmds.put({"generation": generation, "rank": rank, "world_size": len(members), "store_host": "127.0.0.1",
                        "store_port": store.port, "backend": sc.backend, "collective_timeout_s": sc.timeout_s,
                        "store_prefix": prefix})

    def collect(n: int) -> list[tuple]:
        got = []
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{sc.name}: {len(got)} of {n} ranks reported before the deadline")
            try:
                got.append(results.get(timeout=min(left, 5)))
            except queue.Empty:
                continue
        return got

    try:
        assign(0, slots)
        if sc.fault is None:
            done = collect(sc.world)
            assert all(d[0] == "done" for d in done), [d[:3] for d in done]
            out["params"] = next(d[3] for d in done if d[1] == 0)
            out["pinned"] = [d[2]["pinned"] for d in done]
            return out
        victim = slots[1]
        survivors = [s for s in slots if s is not victim]
        got = collect(len(survivors))  # the survivors' generation ends: their group broke under them
        fault_at = time.time()
        assert all(g[0] == "broken" for g in got), [g[:3] for g in got]
        out["detect_errors"] = sorted({g[2]["error"][:80] for g in got})
        pids = {g[1]: g[2]["pid"] for g in got}
        victim.proc.kill()  # frozen or dead: gone for good
        victim.proc.join(10)
        new = Slot(ctx, sc.world, sc, results, f"file://{run_dir}")
        members = survivors + [new]
        assign(1, members)
        done = collect(len(members))
        assert all(d[0] == "done" for d in done), [d[:3] for d in done]
        by_slot = {d[1]: d for d in done}
        assert all(by_slot[s.slot][2]["pid"] == pids[s.slot] for s in survivors), "a survivor lost its process"
        restored = [e for d in done for e in d[2]["events"] if e["event"] == "restored"]
        out["restored_sources"] = sorted({e["source"] for e in restored})
        out["lost_steps"] = max(e["lost_steps"] for e in restored)
        first = min(d[2]["first_step_at"] for d in done)
        out["recovery_s"] = round(first - fault_at, 3)
        out["params"] = by_slot[0][3]
        out["pinned"] = [d[2]["pinned"] for d in done]
        return out
    finally:
        for s in slots + ([new] if "new" in locals() else []):
            try:
                s.cmds.put(None)
            except Exception:  # noqa: BLE001
                pass
        for s in slots + ([new] if "new" in locals() else []):
            s.proc.join(5)
            if s.proc.is_alive():
                s.proc.kill()


def scenarios(n_gpus: int) -> tuple[list[Scenario], list[str]]:
    if n_gpus == 0:
        plans = [Scenario(f"cpu-gloo-{f}", 2, "gloo", "cpu", f) for f in ("kill", "freeze")]
        skipped = ["NCCL (no GPU)", "gloo with CUDA tensors (no GPU)", "pinned snapshots (no GPU)"]
        return plans, skipped
    if n_gpus == 1:
        plans = [Scenario("1gpu-nccl-single", 1, "nccl", "cuda", None, (0,))]
        plans += [Scenario(f"1gpu-gloo-shared-{f}", 2, "gloo", "cuda", f, (0,)) for f in ("kill", "freeze")]
        return plans, ["NCCL across GPUs (1 GPU)"]
    world = min(n_gpus, 4)
    gpus = tuple(range(world))
    return [Scenario(f"{world}gpu-nccl-{f}", world, "nccl", "cuda", f, gpus, timeout_s=10.0)
            for f in ("kill", "freeze")], []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=540.0, help="seconds for the whole check")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    plans, skipped = scenarios(n)
    print(f"gpu_check: torch {torch.__version__}, {n} GPU(s){': ' + torch.cuda.get_device_name(0) if n else ''}",
          flush=True)
    report: list[dict[str, Any]] = []
    failures: list[str] = []
    refs: dict[tuple, Any] = {}
    for sc in plans:
        try:
            key = (sc.world, sc.backend, sc.device)
            if sc.fault is not None and key not in refs:
                refs[key] = run_scenario(Scenario(f"{sc.name}-reference", sc.world, sc.backend, sc.device, None,
                                                  sc.gpus, sc.timeout_s), deadline)["params"]
            res = run_scenario(sc, deadline)
            if sc.fault is not None:
                res["equal"] = all(torch.equal(res["params"][k], refs[key][k]) for k in refs[key])
                assert res["equal"], "final parameters differ from the run without the fault"
                assert res["lost_steps"] <= 1, f"lost {res['lost_steps']} steps"
            if sc.device == "cuda":
                assert all(x for x in res["pinned"] if x is not None), "a CUDA snapshot is not pinned"
            res.pop("params", None)
            res["ok"] = True
            print(f"  {sc.name}: ok {json.dumps({k: v for k, v in res.items() if k not in ('scenario', 'ok')})}",
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on with the next scenario
            res = {"scenario": sc.name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            failures.append(sc.name)
            print(f"  {sc.name}: FAILED {res['error']}", flush=True)
        report.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps({"gpus": n, "torch": torch.__version__, "scenarios": report,
                                               "skipped": skipped}, indent=1, default=str))
    verdict = "PASS" if not failures else f"FAIL ({', '.join(failures)})"
    print(f"gpu_check: {verdict}; ran {len(plans)} scenario(s) on {n} GPU(s)"
          f"{'; skipped: ' + ', '.join(skipped) if skipped else ''}", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
