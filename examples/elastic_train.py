"""AFTER: examples/torchrun_train.py moved to elastic (five changes, marked `# elastic:`).

    elastic run examples/elastic_train.py:train --min-workers 2 --max-workers 4 \\
        --checkpoint-uri file:///tmp/runs/example --config lr=0.05 --config batch_size=64 --config epochs=2

Workers may now die, join or be preempted: the run keeps going from the newest committed step.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import elastic  # elastic: (replaces torch.distributed, DDP, DataLoader and DistributedSampler imports)


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g)
    y = (x @ torch.randn(32, 8, generator=g)).argmax(1)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 8))


def train(config: dict) -> None:
    torch.set_num_threads(1)
    ctx = elastic.get_context()  # elastic: instead of dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    state = elastic.TrainState(model=model, optimizer=opt)  # elastic: what a rank must not lose
    ctx.restore(state)  # elastic: the newest committed state (nothing on a fresh run)
    ddp = ctx.prepare_model(model)  # elastic: instead of DDP(model)
    dataset = make_data()
    steps = config["epochs"] * (len(dataset) // config["batch_size"])
    loader = ctx.data_loader(dataset, global_batch_size=config["batch_size"], steps=steps,  # elastic: instead of
                             num_workers=1)  # DistributedSampler + DataLoader (starts at state.step, any world size)
    for x, y in loader:
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.commit(state, metrics={"loss": loss.item()})  # elastic: ends the step (progress, checkpoints)
