"""Unit: ExactDDP, the bucketed reduction whose layout is a pure function of the model (3 ranks in
threads on real gloo groups)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from elastic._internal.worker.ddp import ExactDDP, layout

pytestmark = pytest.mark.timeout(120)


def ranks(n: int, fn):
    """fn(rank, group) in n threads on one gloo group each generation; results in rank order."""
    store = dist.HashStore()
    out: list = [None] * n

    def run(r: int) -> None:
        try:
            pg = dist.ProcessGroupGloo(dist.PrefixStore("g", store), r, n, timedelta(seconds=30))
            out[r] = fn(r, pg)
        except BaseException as exc:  # noqa: BLE001
            out[r] = exc

    ts = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(100)
    for r, v in enumerate(out):
        if isinstance(v, BaseException):
            raise AssertionError(f"rank {r}: {v!r}") from v
    return out


def init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights without the global RNG (threads share it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def blocks(n: int = 24, width: int = 64) -> nn.Module:
    layers = []
    for _ in range(n):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return init(nn.Sequential(*layers, nn.Linear(width, 4)), 0)


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(6, 64, generator=torch.Generator().manual_seed(100 * step + rank))


def train(model: nn.Module, pg, rank: int, steps: range, rewrap_at: int | None = None) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ddp = ExactDDP(model, process_group=pg)
    for step in steps:
        if step == rewrap_at:  # what a rebuild does: a new wrapper around the trained model
            ddp.remove_hooks()
            ddp = ExactDDP(model, process_group=pg)
        opt.zero_grad()
        ddp(batch(step, rank)).square().mean().backward()
        opt.step()
    ddp.remove_hooks()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_rewrapped_model_trains_bitwise_like_one_that_never_was_at_3_ranks():
    """The drift DDP has (its first iteration reduces with another bucket layout) does not exist."""
    straight = ranks(3, lambda r, pg: train(blocks(), pg, r, range(6)))
    rewrapped = ranks(3, lambda r, pg: train(blocks(), pg, r, range(6), rewrap_at=3))
    for k in straight[0]:
        assert torch.equal(straight[0][k], rewrapped[0][k]), k
        assert torch.equal(straight[0][k], straight[2][k]), k  # replicas agree


def test_the_layout_is_fixed_at_construction_whatever_order_gradients_arrive_in():
    model = blocks()
    caps = {"bucket_cap_mb": 0.1, "first_bucket_mb": 0.02}  # a small model, small buckets: several of them
    fresh = layout([p for p in model.parameters()], **caps)
    # Gradients arriving in another order (a model whose last layer is computed first) or a trained
    # wrapper: the layout is the same.
    def fn(r, pg):
        ddp = ExactDDP(model if r == 0 else blocks(), process_group=pg, **caps)
        before = ddp.bucket_layout
        for step in range(3):
            out = ddp(batch(step, r))
            (out.square().mean() + (ddp.module[0].weight.sum() * 0 if step == 1 else 0)).backward()
        after = ddp.bucket_layout
        order = list(ddp._launched)
        ddp.remove_hooks()
        return before, after, order

    res = ranks(3, fn)
    assert all(before == after == fresh for before, after, _ in res)
    # Fewer collectives than tensors: one per bucket (the count does not grow with parameter tensors).
    n_tensors = len(list(model.parameters()))
    assert 1 < len(fresh) < n_tensors / 10 and all(len(o) == len(fresh) for _, _, order in res for o in order)


def test_gradients_are_the_average_and_no_sync_accumulates():
    def fn(r, pg):
        m = init(nn.Linear(5, 3), 1)
        ref = nn.Linear(5, 3)
        ref.load_state_dict(m.state_dict())
        ddp = ExactDDP(m, process_group=pg)
        with ddp.no_sync():
            ddp(batch(0, r)[:, :5]).sum().backward()  # accumulated locally, not reduced
        local = m.weight.grad.clone()
        ddp(batch(1, r)[:, :5]).sum().backward()
        ddp.remove_hooks()
        ref(batch(0, r)[:, :5]).sum().backward()
        ref(batch(1, r)[:, :5]).sum().backward()
        return local, m.weight.grad.clone(), ref.weight.grad.clone()

    res = ranks(3, fn)
    mean = sum(r[2] for r in res) / 3
    for local, reduced, own in res:
        assert torch.allclose(reduced, mean, atol=1e-6)
        assert not torch.allclose(local, mean)  # inside no_sync nothing was reduced
    assert torch.equal(res[0][1], res[1][1])


def test_unused_parameters_get_the_average_where_someone_used_them_and_stay_none_otherwise():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.never = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            init(self, 2)

        def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
            return self.b(self.a(x)) if use_b else self.a(x)

    def fn(r, pg):
        m = Two()
        ddp = ExactDDP(m, process_group=pg)
        ddp(batch(0, r)[:, :4], use_b=(r == 0)).sum().backward()
        ddp.remove_hooks()
        return m.a.weight.grad, m.b.weight.grad, m.never.weight.grad

    res = ranks(3, fn)
    assert all(r[2] is None for r in res)  # unused everywhere: None, as DDP leaves it
    assert all(r[1] is not None for r in res) and torch.equal(res[1][1], res[0][1])  # averaged with zeros
    assert torch.equal(res[0][0], res[2][0])
