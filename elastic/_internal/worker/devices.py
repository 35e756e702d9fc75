"""Which device a rank uses, and what torch's environment says about its place in the group.

Pure functions of what Ray assigned and what the process can see, so that they are unit-tested
without Ray or a GPU. One device per rank: the GPU Ray assigned to the worker actor (Ray sets
CUDA_VISIBLE_DEVICES to it, so inside the process it is usually cuda:0). Several ranks may share a
GPU (gpus_per_worker < 1) on gloo; NCCL refuses two ranks on one device, so the config does too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

NCCL_ENV = {
    # A watchdog that finds a failed or timed-out collective aborts the communicator and lets the
    # blocked call raise, instead of tearing the process down: survivors keep their process and
    # their host snapshot (torch's default, 1, kills the process with its peer).
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    # The heartbeat monitor would kill a process whose watchdog looks stuck: elastic's own
    # supervisor bounds every wait instead.
    "TORCH_NCCL_ENABLE_MONITORING": "0",
    # No multi-GB flight-recorder dumps on every membership change.
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
}
"""Set in every worker actor's environment (before torch creates a communicator)."""


def cuda_index(gpu_ids: Sequence[str | int], visible: str | None) -> int:
    """The torch device index of the first GPU Ray assigned, given CUDA_VISIBLE_DEVICES.

    Ray usually narrows CUDA_VISIBLE_DEVICES to the assigned GPUs (then the index is the id's position
    there, normally 0); with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES the process sees every GPU and
    the id is the index itself.
    """
    if not gpu_ids:
        raise ValueError("no GPU was assigned to this worker: ask for gpus_per_worker > 0")
    gid = str(gpu_ids[0])
    if visible is None or visible.strip() == "":
        return int(gid)
    shown = [v.strip() for v in visible.split(",") if v.strip()]
    if gid in shown:
        return shown.index(gid)
    raise ValueError(f"GPU {gid} assigned by Ray is not visible (CUDA_VISIBLE_DEVICES={visible!r})")


def device_for(gpus_per_worker: float, gpu_ids: Sequence[str | int], *, visible: str | None = None,
               cuda_available: bool | None = None) -> torch.device:
    """This rank's device: CPU without GPUs, else the GPU Ray assigned (shared ones included)."""
    if gpus_per_worker <= 0:
        return torch.device("cpu")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not available:
        raise RuntimeError("gpus_per_worker > 0 but CUDA is not available in this worker (no GPU, or a CPU build "
                           "of torch)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    return torch.device("cuda", cuda_index(gpu_ids, visible))


def torch_env(rank: int, world_size: int, local_rank: int, local_world_size: int) -> dict[str, str]:
    """What torchrun would set for this rank (not MASTER_ADDR/PORT: elastic owns the rendezvous, and
    user code must not call init_process_group itself)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world_size)}


def backend_for(gpus_per_worker: float, requested: str = "auto") -> str:
    """nccl for one GPU per rank, gloo otherwise (CPU, or ranks sharing a GPU)."""
    if requested != "auto":
        return requested
    return "nccl" if gpus_per_worker >= 1 else "gloo"
