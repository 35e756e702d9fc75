"""Shared fixtures: one local Ray instance per test module, shut down afterwards."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def final_model(uri: str) -> dict:
    """The model tensors of the newest committed checkpoint at `uri`."""
    from elastic._internal.checkpoint import CheckpointStore

    full = CheckpointStore(uri).load_full()
    return full["model"]


def assert_models_equal(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |d| = {(a[k] - b[k]).abs().max().item():.3g}"


class References(dict):
    """Failure-free final models by world size, each computed on first use (once per module):
    `fit(uri, workers)` runs the failure-free job."""

    def __init__(self, tmp_path_factory, fit, prefix: str = "ref"):
        super().__init__()
        self._tmp, self._fit, self._prefix = tmp_path_factory, fit, prefix

    def __missing__(self, workers: int) -> dict:
        uri = self._tmp.mktemp(f"{self._prefix}{workers}")
        r = self._fit(uri, workers)
        assert r.ok, r.error
        self[workers] = final_model(str(uri))
        return self[workers]
