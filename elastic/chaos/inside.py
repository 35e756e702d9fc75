"""A fault fired inside one of FSDP2's collectives: the rank launches its share of the next
all-gather (forward) or reduce-scatter (backward), then dies, so that its peers are blocked in that
very collective when it goes (a fault at a step boundary lands between collectives instead).

FSDP2 issues both through `torch.distributed.all_gather_single` / `reduce_scatter_single`, looked
up at call time; `arm` replaces the one named for the next call in this process only.
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
    name = COLLECTIVES[collective]
    real = getattr(dist, name)

    def launch_then_fire(*args: Any, **kwargs: Any) -> Any:
        setattr(dist, name, real)  # once
        work = real(*args, **{**kwargs, "async_op": True})
        fire()
        return work if kwargs.get("async_op") else work.wait()

    setattr(dist, name, launch_then_fire)
