"""The main job: a small CNN on scikit-learn's bundled 8x8 digits, trained by elastic on 2 workers.

    python scripts/demo_digits.py                      # fresh run in a temp dir
    python scripts/demo_digits.py --checkpoint-uri file:///tmp/runs/digits   # resumable location
    elastic run scripts/demo_digits.py:train --min-workers 2 --checkpoint-uri file:///tmp/runs/d

No download: the data set ships inside scikit-learn. Prints held-out accuracy at the end.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import elastic


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    n_test = len(x) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train(config: dict) -> None:
    torch.set_num_threads(1)
    ctx = elastic.get_context()
    x_train, y_train, x_test, y_test = load_digits_split()
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.05), momentum=0.9)
    state = elastic.TrainState(model=model, optimizer=opt)
    ctx.restore(state)
    ddp = ctx.prepare_model(model)
    # A standard DataLoader (a loader process, prefetching) whose batches are elastic's: the global
    # batch of each step is the same at any world size, and the loader starts at the restored step.
    loader = ctx.data_loader(TensorDataset(x_train, y_train), global_batch_size=config.get("global_batch_size", 64),
                             steps=config.get("steps", 300), num_workers=config.get("loader_workers", 1))
    for xb, yb in loader:
        # Summed loss scaled so that DDP's average is the full global batch's mean-loss gradient.
        loss = F.cross_entropy(ddp(xb), yb, reduction="sum") * loader.batch_sampler.loss_scale()
        opt.zero_grad()
        loss.backward()
        opt.step()
        # reduce=True: the logged loss is the mean over the ranks' shares (one small collective).
        ctx.commit(state, metrics={"loss": loss.item()}, reduce=True)
    if ctx.is_main:
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        ctx.report({"test_accuracy": acc})
        print(f"held-out accuracy: {acc:.4f} on {len(y_test)} test images", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--checkpoint-uri", default=None)
    p.add_argument("--every-n-steps", type=int, default=20)
    args = p.parse_args(argv)
    trainer = elastic.ElasticTrainer(
        train,
        train_loop_config={"lr": 0.05, "steps": args.steps, "global_batch_size": 64},
        scaling=elastic.ScalingConfig(min_workers=args.workers, max_workers=args.workers),
        checkpoint=elastic.CheckpointConfig(uri=args.checkpoint_uri, every_n_steps=args.every_n_steps, keep_last=3),
        failure=elastic.FailureConfig(max_failures=10),
        name="digits",
    )
    result = trainer.fit(raise_on_failure=False)
    acc = result.metrics.get("test_accuracy")
    if acc is not None:
        print(f"demo: held-out accuracy {acc:.4f} ({'ok' if acc >= 0.9 else 'below 0.9'})")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
