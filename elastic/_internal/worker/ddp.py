"""ExactDDP: data-parallel gradient reduction in a few large buckets whose layout is a pure function
of the model, so that results never depend on when the wrapper was built.

Why not torch's DistributedDataParallel: DDP reduces its first iteration with one bucket layout and
then rebuilds the buckets in the order gradients became ready. With 3+ ranks a ring allreduce sums
each element in an order that depends on where it sits in its bucket, so a run that re-wraps the
model after a failure (every rebuild does) drifts bitwise from one that did not. Reducing every
parameter separately fixes that but costs one collective per tensor (hundreds in a transformer).

Here the layout is fixed at construction: parameters in reverse registration order (the order their
gradients usually become ready), split by dtype and device, cut at `bucket_cap_mb` (a small first
bucket, as DDP has, so that communication starts early). A bucket's allreduce starts as soon as all
its gradients are accumulated (overlapping the rest of backward); the end of backward waits for all
of them and points each parameter's .grad at its slice of the reduced bucket. Gradient accumulation
(`no_sync`) and parameters that get no gradient in a step (on some or all ranks) work as in DDP:
a parameter unused everywhere keeps grad None, one unused only somewhere gets the average.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from elastic._internal import compat
from elastic._internal.collectives import CollectiveClock

BUCKET_CAP_MB = 25.0
FIRST_BUCKET_MB = 1.0


@dataclass(frozen=True)
class Slot:
    param_index: int
    offset: int
    numel: int


@dataclass(frozen=True)
class BucketLayout:
    """Which parameters share a bucket, and where: a pure function of the model."""

    dtype: torch.dtype
    device: torch.device
    slots: tuple[Slot, ...]

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)


def layout(params: list[nn.Parameter], *, bucket_cap_mb: float = BUCKET_CAP_MB,
           first_bucket_mb: float = FIRST_BUCKET_MB) -> list[BucketLayout]:
    """Buckets over `params` (registration order): reverse order, one dtype and device per bucket,
    the first of each capped at `first_bucket_mb`, the others at `bucket_cap_mb`."""
    buckets: list[BucketLayout] = []
    current: dict[tuple[torch.dtype, torch.device], list[Slot]] = {}
    filled: dict[tuple[torch.dtype, torch.device], int] = {}
    closed: dict[tuple[torch.dtype, torch.device], int] = {}
    for i in reversed(range(len(params))):
        p = params[i]
        key = (p.dtype, p.device)
        nbytes = p.numel() * p.element_size()
        cap = (first_bucket_mb if closed.get(key, 0) == 0 else bucket_cap_mb) * 2**20
        slots = current.setdefault(key, [])
        if slots and filled[key] + nbytes > cap:
            buckets.append(BucketLayout(key[0], key[1], tuple(slots)))
            closed[key] = closed.get(key, 0) + 1
            slots = current[key] = []
            filled[key] = 0
        offset = slots[-1].offset + slots[-1].numel if slots else 0
        slots.append(Slot(i, offset, p.numel()))
        filled[key] = filled.get(key, 0) + nbytes
    buckets += [BucketLayout(k[0], k[1], tuple(s)) for k, s in current.items() if s]
    return buckets


class _Bucket:
    def __init__(self, spec: BucketLayout, params: list[nn.Parameter]):
        self.spec = spec
        self.params = [params[s.param_index] for s in spec.slots]
        n = len(self.params)
        # Gradients, then one "used here" flag per parameter: reduced together, one collective.
        self.buffer = torch.zeros(spec.numel + n, dtype=spec.dtype, device=spec.device)
        self.views = [self.buffer[s.offset: s.offset + s.numel].view_as(p) for s, p in zip(spec.slots, self.params)]
        self.flags = self.buffer[spec.numel:]
        self.ready: set[int] = set()
        self.work: Any = None
        self.all_here = False


class ExactDDP(nn.Module):
    """A drop-in for DistributedDataParallel over `process_group` (any group object with
    allreduce/broadcast: the default group in a worker, a gloo group in a test)."""

    def __init__(self, module: nn.Module, *, process_group: Any, clock: CollectiveClock | None = None,
                 bucket_cap_mb: float = BUCKET_CAP_MB, first_bucket_mb: float = FIRST_BUCKET_MB,
                 broadcast_buffers: bool = True,
                 broadcast_parameters: bool = True, **_ignored: Any):
        super().__init__()
        self.module = module
        self.pg = process_group
        self.world = process_group.size()
        self.clock = clock or CollectiveClock()
        self.broadcast_buffers = broadcast_buffers
        self._params = [p for p in module.parameters() if p.requires_grad]
        self.bucket_layout = layout(self._params, bucket_cap_mb=bucket_cap_mb, first_bucket_mb=first_bucket_mb)
        self._buckets = [_Bucket(spec, self._params) for spec in self.bucket_layout]
        self._where = {id(p): (b, j) for b in self._buckets for j, p in enumerate(b.params)}
        self._sync = True
        self._in_backward = False
        self._launched: list[list[int]] = []
        """Per backward: the order in which bucket indices were launched (tests read it)."""
        if broadcast_parameters and self.world > 1:
            # As DDP: every replica starts from rank 0's parameters and buffers.
            self._broadcast([t.data for t in module.parameters()] + [b for b in module.buffers()])
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]

    # -- nn.Module ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.broadcast_buffers and self.world > 1 and torch.is_grad_enabled():
            buffers = list(self.module.buffers())
            if buffers:
                self._broadcast(buffers)
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the next backward outside the block reduces the sum."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    # -- reduction ---------------------------------------------------------------------------
    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._sync or self.world == 1:
            return
        if not self._in_backward:
            self._in_backward = True
            self._launched.append([])
            compat.queue_backward_callback(self._finish)
        bucket, j = self._where[id(p)]
        view = bucket.views[j]
        if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
        bucket.ready.add(j)
        if len(bucket.ready) == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        if len(bucket.ready) == len(bucket.params):
            bucket.flags.fill_(1)
        else:
            for j in range(len(bucket.params)):
                if j not in bucket.ready:  # no gradient here this step: contributes zeros
                    bucket.views[j].zero_()
            bucket.flags.copy_(torch.tensor([1.0 if j in bucket.ready else 0.0 for j in range(len(bucket.params))],
                                            dtype=bucket.flags.dtype))
        bucket.all_here = len(bucket.ready) == len(bucket.params)
        bucket.buffer.div_(self.world)
        self.clock.enter()
        try:
            bucket.work = self.pg.allreduce([bucket.buffer], _sum())
        except Exception:
            self.clock.leave()
            self.clock.broken = True
            raise
        self._launched[-1].append(self._buckets.index(bucket))

    def _finish(self) -> None:
        """End of backward: launch what waited on unused parameters, wait for all, hand out grads."""
        self._in_backward = False
        try:
            for b in self._buckets:
                if b.work is None:
                    self._launch(b)
            for b in self._buckets:
                b.work.wait()
        except Exception:
            self.clock.broken = True
            raise
        finally:
            self.clock.leave()
        for b in self._buckets:
            b.work = None
            b.ready.clear()
            # Every parameter had a gradient here, so it is used; otherwise ask whether any rank had.
            used = None if b.all_here else (b.flags > 0).tolist()
            for j, p in enumerate(b.params):
                if used is None or used[j]:
                    if p.grad is not b.views[j]:
                        p.grad = b.views[j]
                else:
                    p.grad = None

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into `tensors`, one collective per dtype and device."""
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        with torch.no_grad(), self.clock.timing():
            for ts in groups.values():
                flat = torch.cat([t.reshape(-1) for t in ts])
                self.pg.broadcast([flat], opts).wait()
                offset = 0
                for t in ts:
                    t.copy_(flat[offset: offset + t.numel()].view_as(t))
                    offset += t.numel()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _sum() -> Any:
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM
    return opts
