"""elastic: a fault-tolerant, elastic training runtime for PyTorch on Ray.

Driver side: ElasticTrainer and the configs. Worker side (inside the training function):
get_context(), TrainState, ElasticSampler.
"""

from elastic.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastic.errors import (CheckpointCorruptError, CheckpointError, CheckpointMismatchError, ConfigError,
                            ElasticError, NoCheckpointError, PlacementError, StorageError,
                            StorageUnavailableError, TrainingFailedError, TransientStorageError)
from elastic.result import Result
from elastic.sampler import ElasticSampler
from elastic.train_state import TrainState
from elastic.trainer import ElasticTrainer
from elastic.worker.context import WorkerContext, get_context


__all__ = [
    "CheckpointConfig", "CheckpointCorruptError", "CheckpointError", "CheckpointMismatchError", "ConfigError",
    "ElasticError", "ElasticSampler", "ElasticTrainer", "FailureConfig", "NoCheckpointError", "PlacementError",
    "Result", "RunConfig", "ScalingConfig", "StorageError", "StorageUnavailableError", "TrainState",
    "TrainingFailedError", "TransientStorageError", "WorkerContext", "get_context",
]
