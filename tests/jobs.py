"""Training functions used by the integration tests: small, deterministic, fault-injectable."""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import elastic
from elastic.chaos.faults import maybe_inject, parse_faults

N_SAMPLES = 512
IN_DIM = 16


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N_SAMPLES, IN_DIM, generator=g)
    w = torch.randn(IN_DIM, 4, generator=g)
    y = (x @ w).argmax(1)
    return x, y


def make_model(width: int = 32, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Linear(IN_DIM, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 4))


def train(config: dict) -> None:
    """config: steps, lr, width, global_batch, faults=[{kind, step, rank}], marker_dir, step_sleep."""
    torch.set_num_threads(1)
    ctx = elastic.get_context()
    x, y = make_data()
    model = make_model(config.get("width", 32), config.get("dropout", 0.1))
    opt = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.05), momentum=0.9)
    state = elastic.TrainState(model=model, optimizer=opt)
    ctx.restore(state)
    ddp = ctx.prepare_model(model)
    sampler = elastic.ElasticSampler(num_samples=N_SAMPLES, global_batch_size=config.get("global_batch", 48), seed=3)
    faults = parse_faults(config.get("faults", []))
    marker_dir = config.get("marker_dir", "/tmp")
    step_sleep = config.get("step_sleep", 0.0)
    while state.step < config["steps"]:
        maybe_inject(faults, step=state.step, rank=ctx.rank, marker_dir=marker_dir)
        idx = sampler.indices(step=state.step, rank=ctx.rank, world_size=ctx.world_size)
        loss = F.cross_entropy(ddp(x[idx]), y[idx], reduction="sum") * sampler.loss_scale(ctx.world_size)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step_sleep:
            import time

            time.sleep(step_sleep)
        ctx.commit(state, metrics={"loss": loss.item() / ctx.world_size, "pid": float(os.getpid())})


def train_other_model(config: dict) -> None:
    """Same loop, different layer sizes: its checkpoints must not load into `train`'s model."""
    train({**config, "width": 8})
