"""Checkpoint stall vs. time-to-durable, on local disk, one process.

Compares, for one ~N MB state (model-like tensors plus Adam-like moments):
  raw write        one sequential write of the same bytes + fsync (the disk's ceiling)
  torch.save       synchronous torch.save + fsync (the training loop stalls for all of it)
  dcp.save         torch.distributed.checkpoint, synchronous, no_dist
  elastic sync     Checkpointer(async_save=False): stall until the manifest is committed
  elastic async    Checkpointer(async_save=True): stall = copy into reused host buffers + plan;
                   durable = committed manifest (the write runs on a background thread)
  elastic staged   the runtime's path: the state handed over is already a host copy nobody writes
                   to (the per-step snapshot's buffers, staged=True), so no copy at all: durable =
                   plan + write + commit. Write throughput is measured on this row.
Reports medians of --repeats runs. Usage: python scripts/bench_checkpoint.py [--mb 100] [--dir D]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from elastic._internal import tree
from elastic._internal.checkpoint import Checkpointer


def make_state(mb: int) -> dict[str, Any]:
    n = mb * (1 << 20) // 4 // 3  # params + two moments = 3 tensors' worth of floats
    shapes = [(n // 8 // 1024, 1024)] * 8
    g = torch.Generator().manual_seed(0)
    model = {f"layer{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    optim = {
        k: {"exp_avg": torch.randn(v.shape, generator=g), "exp_avg_sq": torch.rand(v.shape),
            "step": torch.tensor(1.0)}
        for k, v in model.items()
    }  # fmt: skip
    return {"model": model, "optim": {"state": optim, "param_groups": [{"lr": 1e-3}]}, "step": 1}


def nbytes(d: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in tree.tensor_leaves(d))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir)
    state = make_state(args.mb)
    size = nbytes(state)
    blob = os.urandom(size)
    rows: dict[str, list[tuple[float, float]]] = {}

    def add(name: str, stall: float, durable: float) -> None:
        rows.setdefault(name, []).append((stall, durable))

    def raw_write(path: str) -> None:
        with open(path, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

    def torch_save(path: str) -> None:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    ck_sync = Checkpointer(os.path.join(root, "sync"), async_save=False, keep_last=1)
    ck_async = Checkpointer(os.path.join(root, "async"), async_save=True, keep_last=1)
    ck_staged = Checkpointer(os.path.join(root, "staged"), async_save=True, keep_last=1)
    first_async: tuple[float, float] | None = None
    try:
        for r in range(args.repeats):
            t = timed(lambda: raw_write(os.path.join(root, f"raw{r}")))
            add("raw write + fsync", t, t)
            t = timed(lambda: torch_save(os.path.join(root, f"ts{r}.pt")))
            add("torch.save + fsync", t, t)
            with __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")
                t = timed(lambda: dcp.save(state, checkpoint_id=os.path.join(root, f"dcp{r}"),
                                           no_dist=True))  # fmt: skip
            add("dcp.save (sync)", t, t)
            t = timed(lambda: ck_sync.save(state, step=r + 1, rank=0, world_size=1, pg=None,
                                           store=None))  # fmt: skip
            add("elastic sync", t, t)
            t0 = time.perf_counter()
            ck_async.save(state, step=r + 1, rank=0, world_size=1, pg=None, store=None)
            stall = time.perf_counter() - t0
            info = ck_async.wait(timeout_s=600)
            assert info is not None, ck_async.last_error
            durable = time.perf_counter() - t0
            if r == 0:
                first_async = (stall, durable)  # includes allocating the host buffers
            else:
                add("elastic async (reused buffers)", stall, durable)
            t0 = time.perf_counter()
            ck_staged.save(state, step=r + 1, rank=0, world_size=1, pg=None, store=None, staged=True)
            stall = time.perf_counter() - t0
            info = ck_staged.wait(timeout_s=600)
            assert info is not None, ck_staged.last_error
            add("elastic staged (snapshot buffers)", stall, time.perf_counter() - t0)
            for p in os.listdir(root):  # keep the disk from filling up
                if p.startswith(("raw", "ts", "dcp")):
                    full = os.path.join(root, p)
                    shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if first_async is not None:
        rows["elastic async (first save)"] = [first_async]
    floor = memcpy_floor(state)
    inflation = step_inflation(state, root_parent=args.dir)
    base = statistics.median(s for s, _ in rows["torch.save + fsync"])
    print(f"state: {size / 1e6:.0f} MB in {len(state['model']) * 4} tensors; "
          f"medians of {args.repeats} (first async save: 1 run)")  # fmt: skip
    print(f"{'method':34} {'stall s':>8} {'durable s':>10} {'MB/s':>8} {'stall vs torch.save':>20}")
    for name, vals in rows.items():
        stall = statistics.median(v[0] for v in vals)
        durable = statistics.median(v[1] for v in vals)
        print(f"{name:34} {stall:8.3f} {durable:10.3f} {size / 1e6 / durable:8.0f} "
              f"{stall / base:19.2f}x")  # fmt: skip
    raw = statistics.median(v[1] for v in rows["raw write + fsync"])
    asy = rows.get("elastic async (reused buffers)")
    if asy:
        stall = statistics.median(v[0] for v in asy)
        durable = statistics.median(v[1] for v in asy)
        print(f"\nmemcpy floor (copy into reused buffers): {floor:.4f} s; async stall / floor = {stall / floor:.2f} "
              f"(target <= 3); torch.save / async stall = {base / stall:.1f}x (target >= 5)")
        print(f"async save throughput (copy included) / raw write = {raw / durable:.2f}")
    staged = rows.get("elastic staged (snapshot buffers)")
    if staged:
        durable = statistics.median(v[1] for v in staged)
        print(f"write throughput (staged, the runtime's path) / raw write = {raw / durable:.2f} (target >= 0.8)")
    print(f"step time while a save is writing / idle step time = {inflation:.3f} (target <= 1.10)")


def memcpy_floor(state: dict[str, Any], repeats: int = 5) -> float:
    tensors = [t for _, t in tree.tensor_leaves(state)]
    bufs = [torch.empty_like(t) for t in tensors]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b, t in zip(bufs, tensors):
            b.copy_(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_inflation(state: dict[str, Any], root_parent: str | None) -> float:
    """Median time of a ~20 ms single-threaded compute step while an async save of `state` writes,
    over the median idle step time (the background write must not starve the loop of the GIL)."""
    torch.set_num_threads(1)
    a, b = torch.randn(384, 384), torch.randn(384, 384)

    def step() -> float:
        t0 = time.perf_counter()
        for _ in range(8):
            (a @ b).relu_()
        return time.perf_counter() - t0

    idle = statistics.median(step() for _ in range(40))
    root = tempfile.mkdtemp(prefix="bench_ckpt_infl_", dir=root_parent)
    busy: list[float] = []
    try:
        ck = Checkpointer(os.path.join(root, "run"), async_save=True, keep_last=1)
        for r in range(3):
            ck.save(state, step=r + 1, rank=0, world_size=1, pg=None, store=None)
            while ck.saving:
                busy.append(step())
            ck.wait(timeout_s=600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return statistics.median(busy) / idle if busy else float("nan")


if __name__ == "__main__":
    main()
