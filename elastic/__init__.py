"""elastic: a fault-tolerant, elastic training runtime for PyTorch on Ray.

Driver side: ElasticTrainer and the configs. Worker side (inside the training function):
get_context(), TrainState, ElasticSampler.

Names load on first use (PEP 562): `import elastic` alone does not import torch, so a worker actor
can lower its priority before paying torch's import (see elastic._internal.worker.actor), and the CLI's
storage commands start quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "elastic.callbacks": ("Callback",),
    "elastic.config": ("CheckpointConfig", "FailureConfig", "RunConfig", "ScalingConfig"),
    "elastic.errors": ("CheckpointCorruptError", "CheckpointError", "CheckpointMismatchError", "ConfigError",
                       "ElasticError", "NoCheckpointError", "PlacementError", "StorageError",
                       "StorageUnavailableError", "TrainingFailedError", "TransientStorageError"),
    "elastic.policy": ("DefaultPolicy", "Policy"),
    "elastic.result": ("Result",),
    "elastic.sampler": ("ElasticSampler",),
    "elastic.train_state": ("TrainState",),
    "elastic.trainer": ("ElasticTrainer",),
    "elastic.context": ("WorkerContext", "get_context"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'elastic' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from elastic.callbacks import Callback
    from elastic.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from elastic.errors import (CheckpointCorruptError, CheckpointError, CheckpointMismatchError, ConfigError,
                                ElasticError, NoCheckpointError, PlacementError, StorageError,
                                StorageUnavailableError, TrainingFailedError, TransientStorageError)
    from elastic.policy import DefaultPolicy, Policy
    from elastic.result import Result
    from elastic.sampler import ElasticSampler
    from elastic.train_state import TrainState
    from elastic.trainer import ElasticTrainer
    from elastic.context import WorkerContext, get_context
