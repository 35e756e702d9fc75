"""BEFORE: a plain torchrun-style DDP training script (what most teams start from).

    torchrun --nproc-per-node 2 examples/torchrun_train.py

examples/elastic_train.py is the same script moved to elastic: see README "Moving a torchrun script".
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g)
    y = (x @ torch.randn(32, 8, generator=g)).argmax(1)
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 8))


def train(config: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    ddp = DDP(model)
    dataset = make_data()
    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=config["batch_size"] // dist.get_world_size(), sampler=sampler,
                        num_workers=1, drop_last=True)
    step = 0
    for epoch in range(config["epochs"]):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if dist.get_rank() == 0 and step % 20 == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    train({"lr": 0.05, "batch_size": 64, "epochs": 2})
