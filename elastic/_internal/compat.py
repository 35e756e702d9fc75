"""The private torch and Ray APIs elastic relies on, each behind one function with the versions it was
checked with. A test (tests/test_compat.py) exercises every one, so an upgrade that moves them fails
there, by name, rather than somewhere deep in a run.

Public APIs are used everywhere else; what is here has no public equivalent in the versions elastic
supports (torch >= 2.6, ray >= 2.10).
"""

from __future__ import annotations

from typing import Callable

import torch

CHECKED = {"torch": "2.13.0", "ray": "2.60.0"}


def queue_backward_callback(fn: Callable[[], None]) -> None:
    """Run `fn` once the current backward pass ends (from within a hook that runs during it).

    torch has no public hook for "backward finished"; DDP and FSDP use this same engine call.
    """
    torch.autograd.Variable._execution_engine.queue_callback(fn)  # type: ignore[attr-defined]


def draining_node_ids() -> set[str] | None:
    """Ids of the Ray nodes being drained (a spot preemption, an autoscaler scale-down); None when
    this Ray cannot tell. Ray 2.60 exposes the drain state only in its GCS node table."""
    try:
        import ray

        gcs = ray._private.worker.global_worker.gcs_client  # type: ignore[attr-defined]
        infos = gcs.get_all_node_info(timeout=2)
    except Exception:  # noqa: BLE001 - without it, SIGTERM to the workers still works
        return None
    from ray.core.generated import gcs_pb2  # type: ignore[attr-defined]

    draining = gcs_pb2.NodeSnapshot.State.Value("DRAINING")
    return {nid.hex() for nid, info in infos.items() if info.state_snapshot.state == draining}


def private_api_count() -> int:
    """How many private APIs elastic still uses (the README lists them)."""
    return len(PRIVATE_APIS)


PRIVATE_APIS: dict[str, str] = {
    "torch.autograd.Variable._execution_engine.queue_callback": "end-of-backward hook (ExactDDP)",
    "ray._private.worker.global_worker.gcs_client": "which nodes Ray is draining",
    "torch.distributed.checkpoint.filesystem._StorageInfo": "where a tensor lies in a DCP shard file "
                                                           "(it is pickled into .metadata: plain DCP needs it)",
    "torch.distributed.checkpoint.filesystem._StoragePrefix": "unique shard file names per save",
    "torch.distributed.checkpoint.filesystem._FileSystemWriter": "DCP's shard writer",
    "torch.distributed.checkpoint._fsspec_filesystem.FileSystem": "DCP's fsspec adapter",
    "torch.distributed.fsdp.FSDPModule._get_fsdp_state": "a kept model's FSDP2 parameter groups (kept_model.py)",
    "torch.distributed.fsdp._fully_shard._fsdp_common.FSDPMeshInfo.__post_init__": "re-derives a kept model's "
                                                                                   "process groups from its mesh",
    "torch.distributed.fsdp._fully_shard._fsdp_param.FSDPParam": "its unsharded gradient, left by a backward cut short",
    "torch.testing._internal.distributed.fake_pg": "torch's fake process group, for a standby's rehearsal (rehearsal.py)",
    "torch.distributed.device_mesh.DeviceMesh._compute_coordinate_on_dim": "a mesh's groups, rank and coordinate "
                                                                           "are its attributes (meshes.py)",
}
"""Every private name elastic imports, and why (checked against torch 2.13 and Ray 2.60)."""


def node_drain_supported() -> bool:
    return draining_node_ids() is not None


