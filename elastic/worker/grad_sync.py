"""A DDP communication hook whose result does not depend on DDP's bucket layout.

A freshly built DDP reduces its first iteration with a different bucket layout from the one it
settles on, and with 3+ ranks the ring allreduce then sums each element in a different order, so a
run that rebuilt DDP after a failure drifts bitwise from one that did not. Reducing each
parameter's gradient as its own tensor makes every element's summation order a function of that
parameter's size and the world size only.
"""

from typing import Callable

import torch
import torch.distributed as dist

from elastic.collectives import CollectiveClock


def make_hook(pg: dist.ProcessGroup, clock: CollectiveClock) -> Callable:
    world = dist.get_world_size(pg)

    def launch(buffer: torch.Tensor, params: list[torch.Tensor]) -> torch.futures.Future:
        if world <= 2:
            # Adding two floats is commutative: any layout gives the same bits, so one collective
            # for the whole bucket (what DDP does by default) is exact and cheaper.
            return dist.all_reduce(buffer, group=pg, async_op=True).get_future()
        futures = []
        offset = 0
        for param in params:
            n = param.numel()
            futures.append(dist.all_reduce(buffer[offset : offset + n], group=pg, async_op=True).get_future())
            offset += n
        return torch.futures.collect_all(futures)

    # DDP checks these annotations at runtime, so they must be real objects, not strings.
    def hook(_state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        buffer.div_(world)
        clock.enter()
        try:
            pending = launch(buffer, bucket.parameters())
        except Exception:
            clock.leave()
            clock.broken = True  # the group is gone under us: not a bug in user code
            raise

        def done(all_done: torch.futures.Future) -> torch.Tensor:
            clock.leave()
            try:
                # collect_all may complete early with the first error; only its own value is safe
                # to read (reading a sub-future that has not completed trips an internal assert).
                all_done.value()
            except Exception:
                clock.broken = True
                raise
            return buffer

        return pending.then(done)

    return hook
