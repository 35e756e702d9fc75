"""Unit: one device per rank, from what Ray assigned and what the process sees; torch's env vars."""

from __future__ import annotations

import pytest
import torch

from elastic.config import ScalingConfig
from elastic.errors import ConfigError
from elastic._internal.worker.devices import backend_for, cuda_index, device_for, torch_env

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("ids,visible,index", [
    (["3"], "3", 0),            # Ray narrowed CUDA_VISIBLE_DEVICES to the assigned GPU
    ([5], "4,5,6", 1),          # several visible (a fractional GPU shared with others on the node)
    (["2"], None, 2),           # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: every GPU visible
    (["1"], "", 1),
])
def test_the_device_is_the_gpu_ray_assigned_as_this_process_sees_it(ids, visible, index):
    assert cuda_index(ids, visible) == index
    assert device_for(1, ids, visible=visible, cuda_available=True) == torch.device("cuda", index)


def test_no_gpu_assigned_or_not_visible_is_an_error_not_a_silent_cuda0():
    with pytest.raises(ValueError, match="no GPU was assigned"):
        cuda_index([], "0")
    with pytest.raises(ValueError, match="not visible"):
        cuda_index(["7"], "0,1")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        device_for(1, ["0"], visible="0", cuda_available=False)
    assert device_for(0, [], cuda_available=False) == torch.device("cpu")


def test_several_local_ranks_get_torchrun_style_variables():
    envs = [torch_env(rank, 4, local, 2) for rank, local in ((0, 0), (1, 1), (2, 0), (3, 1))]
    assert envs[3] == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert all("MASTER_ADDR" not in e and "MASTER_PORT" not in e for e in envs)


def test_backend_and_gpu_counts():
    assert backend_for(0) == "gloo" and backend_for(1) == "nccl" and backend_for(0.5) == "gloo"
    assert backend_for(1, "gloo") == "gloo"
    ScalingConfig(gpus_per_worker=0.5)  # ranks sharing a GPU over gloo: allowed
    with pytest.raises(ConfigError, match="NCCL allows one rank per GPU"):
        ScalingConfig(gpus_per_worker=0.5, backend="nccl")
    with pytest.raises(ConfigError, match="one device per rank"):
        ScalingConfig(gpus_per_worker=2)
