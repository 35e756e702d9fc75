"""Every private torch/Ray name elastic uses (elastic._internal.compat.PRIVATE_APIS) still exists and does
what elastic needs, so that an upgrade that moves one fails here, by name."""

from __future__ import annotations

import importlib

import pytest
import torch

from elastic._internal import compat


CONNECTED_ONLY = {"ray._private.worker.global_worker.gcs_client": "test_draining_nodes_are_read_from_a_live_cluster"}
"""Set only once Ray is connected: resolved up to its owner here, used for real by the named test."""


@pytest.mark.parametrize("name", sorted(compat.PRIVATE_APIS))
def test_each_private_name_resolves(name):
    parts = name.split(".")
    if name in CONNECTED_ONLY:
        parts = parts[:-1]
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{name}: no importable module prefix")


def test_the_backward_callback_runs_once_after_the_whole_backward():
    seen: list[str] = []
    w = torch.ones(3, requires_grad=True)

    def hook(_p):
        seen.append("grad")
        compat.queue_backward_callback(lambda: seen.append("end"))

    w.register_post_accumulate_grad_hook(hook)
    (w * 2).sum().backward()
    assert seen == ["grad", "end"]


def test_draining_nodes_are_read_from_a_live_cluster():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert compat.draining_node_ids() == set()  # a live cluster, nothing draining: a set, not None
    finally:
        ray.shutdown()


def test_the_count_in_the_readme_is_the_real_one():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"private APIs: {compat.private_api_count()}" in readme
