"""A small, deterministic, fault-injectable training job: the reference job of the test and chaos
suites, and a safe target for practising failures with `elastic chaos`:

    elastic run "$(python -c 'import elastic.chaos.job as j; print(j.__file__)')":train \\
        --min-workers 2 --checkpoint-uri /tmp/runs/practice --config steps=5000 --config step_sleep=0.05

config: steps, lr, width, dropout, global_batch, step_sleep, strategy (ddp | fsdp | hsdp), loader_workers (read
batches through ctx.data_loader with this many worker processes instead of indexing), faults [{kind, step, rank}] (faults a
rank inflicts on itself, see faults.py; at step REBUILD one fires as a rebuilt group restores, at
FIRST_STEP at the first step a rebuilt group takes),
note_exits (a rank whose step raises writes `left-gen{G}-rank{R}` with the time into marker_dir: when
each survivor got out of a broken collective), trips [step] (the first rank to reach each step creates `trip-step{s}` in marker_dir, for
external faults to wait on), marker_dir.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import elastic
from elastic.chaos.faults import maybe_inject, parse_faults

N_SAMPLES = 512
REBUILD = -1
"""A fault planned at this step fires while a rebuilt group (generation > 0) restores its state."""
FIRST_STEP = -2
"""A fault planned at this step fires at the first step a rebuilt group (generation > 0) takes."""
IN_DIM = 16


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N_SAMPLES, IN_DIM, generator=g)
    w = torch.randn(IN_DIM, 4, generator=g)
    return x, (x @ w).argmax(1)


def make_model(width: int = 32, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Linear(IN_DIM, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width),
                         nn.ReLU(), nn.Linear(width, 4))


def _trip(marker_dir: str, step: int) -> None:
    try:
        fd = os.open(os.path.join(marker_dir, f"trip-step{step}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()} {time.time()}\n".encode())
    os.close(fd)


def train(config: dict) -> None:
    torch.set_num_threads(1)
    ctx = elastic.get_context()
    x, y = make_data()
    # skip_init: a generation that will restore builds the model without drawing its weights.
    with ctx.skip_init_if_restoring() if config.get("skip_init") else contextlib.nullcontext(False) as skipped:
        model = make_model(config.get("width", 32), config.get("dropout", 0.1))
    strategy = config.get("strategy", "ddp")
    fsdp = strategy in ("fsdp", "hsdp")
    if fsdp:  # FSDP2 shards the model in place: the optimizer is built over the sharded parameters
        model = ctx.prepare_model(model, strategy=strategy)
    opt = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.05), momentum=0.9)
    state = elastic.TrainState(model=model, optimizer=opt)
    faults = parse_faults(config.get("faults", []))
    marker_dir = config.get("marker_dir", "/tmp")
    if ctx.generation > 0:
        maybe_inject(faults, step=REBUILD, rank=ctx.rank, marker_dir=marker_dir)
    ctx.restore(state)
    _check_environment(ctx)
    if fsdp and ctx.generation > 0:  # what a sharded restore held in host memory, for the tests
        st = ctx.stats()
        ctx.report({"restore_host_bytes": st["restore_host_bytes"], "shard_bytes": st["shard_bytes"],
                    "restore_mapped_bytes": st["restore_mapped_bytes"], "init_skipped": float(skipped),
                    "model_kept": st["model_kept"]})
    ddp = model if fsdp else ctx.prepare_model(model)
    sampler = elastic.ElasticSampler(num_samples=N_SAMPLES, global_batch_size=config.get("global_batch", 48), seed=3)
    batch = _batches(ctx, config, sampler, x, y)
    try:
        _loop(ctx, config, state, faults, ddp, opt, lambda step: (*batch(step), sampler.loss_scale(ctx.world_size)))
    except BaseException:
        if config.get("note_exits"):
            with open(os.path.join(marker_dir, f"left-gen{ctx.generation}-rank{ctx.rank}"), "w") as f:
                f.write(f"{os.getpid()} {time.time()}\n")
        raise


def _loop(ctx: elastic.WorkerContext, config: dict, state: elastic.TrainState, faults: list, ddp: nn.Module,
          opt: torch.optim.Optimizer, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    marker_dir = config.get("marker_dir", "/tmp")
    trips = set(config.get("trips", []))
    step_sleep = config.get("step_sleep", 0.0)
    first = ctx.generation > 0
    while state.step < config["steps"]:
        if state.step in trips:
            _trip(marker_dir, state.step)
        if first:
            first = False
            maybe_inject(faults, step=FIRST_STEP, rank=ctx.rank, marker_dir=marker_dir)
        maybe_inject(faults, step=state.step, rank=ctx.rank, marker_dir=marker_dir)
        xb, yb, scale = batch(state.step)
        loss = F.cross_entropy(ddp(xb), yb, reduction="sum") * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step_sleep:
            time.sleep(step_sleep)
        ctx.commit(state, metrics={"loss": loss.item() / ctx.world_size})


def _check_environment(ctx: elastic.WorkerContext) -> None:
    """torch's environment agrees with the context in every generation (a torchrun-style library
    reading RANK/WORLD_SIZE finds the same place): a mismatch is a bug, raised as one."""
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    want = {"RANK": str(ctx.rank), "WORLD_SIZE": str(ctx.world_size), "LOCAL_RANK": str(ctx.local_rank),
            "LOCAL_WORLD_SIZE": str(ctx.local_world_size)}
    if env != want:
        raise AssertionError(f"torch's environment {env} disagrees with the context {want}")


def _batches(ctx: elastic.WorkerContext, config: dict, sampler: elastic.ElasticSampler, x: torch.Tensor,
             y: torch.Tensor) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """step -> this rank's batch: indexed through the sampler, or (config loader_workers) the same
    batches through a DataLoader with worker processes."""
    loader_workers = config.get("loader_workers")
    if loader_workers is None:
        def indexed(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            idx = sampler.indices(step=step, rank=ctx.rank, world_size=ctx.world_size)
            return x[idx], y[idx]

        return indexed
    loader = ctx.data_loader(torch.utils.data.TensorDataset(x, y), global_batch_size=sampler.global_batch_size,
                             seed=3, steps=config["steps"], num_workers=loader_workers,
                             prefetch_factor=2 if loader_workers else None)
    batches = iter(loader)
    return lambda _step: next(batches)
