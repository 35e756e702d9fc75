"""A fault fired inside one of FSDP2's collectives: the rank launches its share of the next
all-gather (forward) or reduce-scatter (backward), then dies, so that its peers are blocked in that
very collective when it goes (a fault at a step boundary lands between collectives instead). Or
inside its next buddy exchange ("buddy_exchange"): its receives posted, its first send launched.

FSDP2 issues both through `torch.distributed.all_gather_single` / `reduce_scatter_single`, looked
up at call time; `arm` replaces the one named for the next call in this process only. The buddy
exchange sends through `Collectives.send` on its transfer plane.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

COLLECTIVES = {"all_gather": "all_gather_single", "reduce_scatter": "reduce_scatter_single"}
"""Fault name -> the torch.distributed function FSDP2 calls for it."""


def arm(collective: str, fire: Callable[[], None]) -> None:
    """At this process's next call of `collective`: launch it (async, so its first messages leave),
    then `fire()` (which kills the process). Later calls go to torch unchanged."""
    if collective == "buddy_exchange":
        _arm_buddy_send(fire)
        return
    name = COLLECTIVES[collective]
    real = getattr(dist, name)

    def launch_then_fire(*args: Any, **kwargs: Any) -> Any:
        setattr(dist, name, real)  # once
        work = real(*args, **{**kwargs, "async_op": True})
        fire()
        return work if kwargs.get("async_op") else work.wait()

    setattr(dist, name, launch_then_fire)


def _arm_buddy_send(fire: Callable[[], None]) -> None:
    """At this process's next send on a transfer plane (a buddy exchange: every receive is posted
    first): launch it, then `fire()`."""
    from elastic._internal.collectives import Collectives

    real = Collectives.send

    def send_then_fire(self: Collectives, *args: Any, **kwargs: Any) -> Any:
        Collectives.send = real  # type: ignore[method-assign]  # once
        work = real(self, *args, **kwargs)
        fire()
        return work

    Collectives.send = send_then_fire  # type: ignore[method-assign]
