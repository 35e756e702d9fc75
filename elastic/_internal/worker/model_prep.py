"""Making the user's model data parallel over a generation's training group (ctx.prepare_model), and
remembering how: whether the state is sharded decides how the other pieces snapshot, restore and
save it.
"""

from __future__ import annotations

from typing import Any

import torch

from elastic._internal.collectives import CollectiveClock
from elastic.errors import ConfigError
from elastic._internal.worker import fsdp
from elastic._internal.worker.ddp import ExactDDP
from elastic._internal.worker.groups import ProcessGroups


class ModelPrep:
    """One generation's model: wrapped in ExactDDP or sharded with FSDP2."""

    def __init__(self, groups: ProcessGroups, device: torch.device, clock: CollectiveClock):
        self.groups = groups
        self.device = device
        self._clock = clock
        self.sharded = False
        """The model was sharded with FSDP2 (prepare(strategy="fsdp")): buddy copies, resharding."""
        self._ddp: ExactDDP | None = None

    def prepare(self, model: torch.nn.Module, strategy: str = "ddp", shard_modules: Any = None,
                **ddp_kwargs: Any) -> torch.nn.Module:
        """Move `model` to this rank's device and make it data parallel over the training group:
        "ddp": wrapped in ExactDDP (ddp.py), whose bucket layout is a pure function of the model;
        "fsdp": sharded in place with FSDP2 (fsdp.py), per block then the root."""
        if strategy == "fsdp":
            fsdp.shard(model, self.groups.train, self.device, shard_modules)
            self.sharded = True
            if self.groups.world_size > 1:
                self.groups.open_transfer_plane()
            return model
        if strategy != "ddp":
            raise ConfigError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
        model.to(self.device)
        self._ddp = ExactDDP(model, process_group=self.groups.train, clock=self._clock, **ddp_kwargs)
        return self._ddp

    def release(self) -> None:
        """The wrapper holds the process group: drop it before the group is destroyed."""
        if self._ddp is not None:
            self._ddp.remove_hooks()
        self._ddp = None
