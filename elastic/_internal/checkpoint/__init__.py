"""Durable, sharded, atomic checkpoints on torch.distributed.checkpoint over fsspec.

Worker side: Checkpointer (save collectively, load in place). Supervisor/CLI side: CheckpointStore
(list, latest, verify, clean_partial, load_full). CheckpointInfo crosses Ray actor boundaries.
"""

from elastic._internal.checkpoint.catalog import CheckpointStore
from elastic._internal.checkpoint.checkpointer import Checkpointer
from elastic._internal.checkpoint.layout import CheckpointInfo

__all__ = ["CheckpointInfo", "CheckpointStore", "Checkpointer"]
