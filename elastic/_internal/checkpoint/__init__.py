"""Durable, sharded, atomic checkpoints on torch.distributed.checkpoint over fsspec.

Worker side: Checkpointer (save collectively, load in place). Supervisor/CLI side: CheckpointStore
(list, latest, verify, clean_partial, load_full). CheckpointInfo crosses Ray actor boundaries.

The names below are imported on first use: they import torch, and a submodule that does not (the
fault-injecting filesystem, faulty_fs) must stay importable without it. A chaos run's RunConfig
carries that filesystem, and every worker unpickles it before its __init__ lowers its CPU priority:
an eager torch import here cost each standby ≈ 1.8 s at normal priority on 2 busy cores.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elastic._internal.checkpoint.catalog import CheckpointStore
    from elastic._internal.checkpoint.checkpointer import Checkpointer
    from elastic._internal.checkpoint.layout import CheckpointInfo

__all__ = ["CheckpointInfo", "CheckpointStore", "Checkpointer"]

_HOME = {"CheckpointStore": "catalog", "Checkpointer": "checkpointer", "CheckpointInfo": "layout"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value
