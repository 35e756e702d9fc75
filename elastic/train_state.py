"""TrainState: everything a run must get back after a failure, as one nested state dict.

Model and optimizer go through torch.distributed.checkpoint.state_dict (FQN keys, optimizer state
initialised on a fresh optimizer, so a fresh TrainState is a valid load target). `extra` holds
user values: tensors, small JSON-able values, or objects with state_dict()/load_state_dict()
(an LR scheduler, a data iterator's position).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def is_stateful(obj: Any) -> bool:
    """Whether `obj` keeps its own state (state_dict() and load_state_dict()): an LR scheduler, a
    data iterator's position. Such values of `extra` are saved through their state_dict()."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class TrainState:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        step: int = 0,
        extra: dict[str, Any] | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.step = step
        self.extra: dict[str, Any] = dict(extra or {})

    def state_dict(self) -> dict[str, Any]:
        optimizers = [self.optimizer] if self.optimizer is not None else []
        model_sd, optim_sd = get_state_dict(self.model, optimizers)
        extra = {k: (v.state_dict() if is_stateful(v) else v) for k, v in self.extra.items()}
        return {"model": model_sd, "optim": optim_sd, "step": int(self.step), "extra": extra}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        optimizers = [self.optimizer] if self.optimizer is not None else []
        set_state_dict(
            self.model,
            optimizers,
            model_state_dict=sd["model"],
            optim_state_dict=sd["optim"] if optimizers else {},
        )
        self._load_step_and_extra(sd)

    def _load_step_and_extra(self, sd: dict[str, Any]) -> None:
        """The half of load_state_dict() beside torch's model and optimizer state."""
        self.step = int(sd["step"])
        for key, value in sd.get("extra", {}).items():
            current = self.extra.get(key)
            if is_stateful(current):
                current.load_state_dict(value)
            elif isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
                current.copy_(value)
            else:
                self.extra[key] = value
