"""The sharded example: a small byte-level transformer language model, sharded with FSDP2
(`strategy="fsdp"`) over 2 workers, trained on the Python standard library's own source files.

    python scripts/demo_lm.py                          # fresh run in a temp dir, ~1 min on 2 cores
    python scripts/demo_lm.py --checkpoint-uri file:///tmp/runs/lm      # resumable location
    elastic run scripts/demo_lm.py:train --min-workers 2 --checkpoint-uri file:///tmp/runs/lm

No download: the text is the `.py` files of the interpreter's own standard library (read in name
order, so every rank and every restart sees the same bytes). Each rank holds only its rows of every
parameter and of AdamW's state; a lost rank comes back from its buddy's host copy. Prints the
held-out loss (bits per byte) before and after, and a greedy continuation of a prompt.

`scripts/bench_sharded.py` trains the same model at ≥ 20 M parameters.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import elastic

VOCAB = 256  # bytes


def stdlib_text(max_bytes: int = 2_000_000) -> torch.Tensor:
    """The first `max_bytes` of the standard library's top-level .py files, in name order, as byte ids."""
    root = Path(sysconfig.get_paths()["stdlib"])
    buf = bytearray()
    for f in sorted(root.glob("*.py")):
        buf += f.read_bytes()
        if len(buf) >= max_bytes:
            break
    if len(buf) < 10_000:
        raise RuntimeError(f"found only {len(buf)} bytes of .py files under {root}: is the standard library's source installed?")
    return torch.frombuffer(buf[:max_bytes], dtype=torch.uint8).long()


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4× MLP (no dropout: runs are exact)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, d: int = 128, layers: int = 4, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))  # FSDP2 shards each block
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        # Logits as (batch * context, VOCAB) from a 2-D matmul: a fresh tensor, not a view (FSDP2
        # warns that an in-place op on a returned view would skip its pre-backward hook).
        return self.head(self.ln(x).reshape(-1, x.shape[-1]))


def make_model(config: dict) -> TinyLM:
    torch.manual_seed(config.get("seed", 0))  # every rank builds the same initial weights
    return TinyLM(config.get("d_model", 128), config.get("layers", 4), config.get("heads", 4),
                  config.get("context", 64))


class Windows:
    """Non-overlapping windows of the text: sample i predicts bytes i*T+1 .. i*T+T from i*T .. i*T+T-1."""

    def __init__(self, text: torch.Tensor, context: int) -> None:
        self.text, self.t = text, context
        self.n = (len(text) - 1) // context

    def batch(self, idx: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.as_tensor(idx, dtype=torch.long) * self.t
        rows = starts[:, None] + torch.arange(self.t + 1)
        w = self.text[rows]
        return w[:, :-1], w[:, 1:]


def split(config: dict) -> tuple[Windows, Windows]:
    """Training windows and the held-out last 5 % of the text."""
    text = stdlib_text(config.get("text_bytes", 2_000_000))
    cut = int(len(text) * 0.95)
    t = config.get("context", 64)
    return Windows(text[:cut], t), Windows(text[cut:], t)


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, data: Windows, sampler: elastic.ElasticSampler,
            step: int, rank: int, world: int) -> float:
    """One step on this rank's share of the global batch; returns its mean per-byte loss."""
    x, y = data.batch(sampler.indices(step=step, rank=rank, world_size=world))
    # Summed per-sequence mean losses, scaled so that the gradient average is the global batch's mean.
    loss_sum = F.cross_entropy(model(x), y.reshape(-1), reduction="sum") / data.t
    opt.zero_grad()
    (loss_sum * sampler.loss_scale(world)).backward()
    opt.step()
    return float(loss_sum.item()) / max(1, len(x))


@torch.no_grad()
def held_out_bits(model: nn.Module, data: Windows, n: int = 32) -> float:
    """Mean bits per byte on the first `n` held-out windows (every rank computes it: FSDP's forward
    is a collective)."""
    x, y = data.batch(list(range(min(n, data.n))))
    return F.cross_entropy(model(x), y.reshape(-1)).item() / math.log(2)


@torch.no_grad()
def continue_text(model: nn.Module, prompt: bytes, n: int, context: int) -> bytes:
    """Greedy continuation (run on every rank: each forward gathers the sharded weights)."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids[-context:]]))
        ids.append(int(logits[-1].argmax()))
    return bytes(ids[len(prompt):])


def train(config: dict) -> None:
    torch.set_num_threads(1)
    ctx = elastic.get_context()
    train_data, held_out = split(config)
    with ctx.skip_init_if_restoring():  # a recovery restores the weights: no need to draw them first
        model = make_model(config)
    model = ctx.prepare_model(model, strategy="fsdp")  # shard first: AdamW holds only our rows
    opt = torch.optim.AdamW(model.parameters(), lr=config.get("lr", 3e-3), weight_decay=0.01)
    state = elastic.TrainState(model=model, optimizer=opt)
    ctx.restore(state)
    steps = config.get("steps", 300)
    if state.step == 0:
        ctx.report({"held_out_bits_per_byte_start": held_out_bits(model, held_out)})
    sampler = elastic.ElasticSampler(num_samples=train_data.n, global_batch_size=config.get("global_batch", 16), seed=0)
    while state.step < steps:
        loss = lm_step(model, opt, train_data, sampler, state.step, ctx.rank, ctx.world_size)
        ctx.commit(state, metrics={"loss": loss}, reduce=True)
    bits = held_out_bits(model, held_out)
    sample = continue_text(model, b"def ", config.get("sample_bytes", 60), config.get("context", 64))
    if ctx.is_main:
        ctx.report({"held_out_bits_per_byte": bits, "shard_bytes": ctx.stats()["shard_bytes"]})
        print(f"held-out: {bits:.3f} bits/byte; 'def ' continues as {sample.decode('utf-8', 'replace')!r}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--checkpoint-uri", default=None)
    p.add_argument("--every-n-steps", type=int, default=50)
    args = p.parse_args(argv)
    params = sum(t.numel() for t in make_model({"d_model": args.d_model, "layers": args.layers}).parameters())
    print(f"demo: a {params / 1e6:.2f} M-parameter byte-level LM, sharded (FSDP2) over {args.workers} workers", flush=True)
    result = elastic.ElasticTrainer(
        train,
        train_loop_config={"steps": args.steps, "d_model": args.d_model, "layers": args.layers},
        scaling=elastic.ScalingConfig(min_workers=args.workers, max_workers=args.workers),
        checkpoint=elastic.CheckpointConfig(uri=args.checkpoint_uri, every_n_steps=args.every_n_steps, keep_last=2),
        failure=elastic.FailureConfig(max_failures=10),
        name="lm",
    ).fit(raise_on_failure=False)
    start, end = result.metrics.get("held_out_bits_per_byte_start"), result.metrics.get("held_out_bits_per_byte")
    if end is not None:
        print(f"demo: held-out bits/byte {start if start is None else round(start, 3)} -> {end:.3f} "
              f"({'ok' if start is None or end < start - 1.0 else 'learned too little'})")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
