"""Fixtures of the chaos suite: a Ray instance per module set up for chaos, and the seed. The full
matrix (marker chaos_full) is left out of the default run by the root conftest.py."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--chaos-seed", type=int, default=None, help="replay chaos tests with this seed")


def pytest_configure(config):
    seed = config.getoption("--chaos-seed", default=None)
    if seed is not None:
        os.environ["CHAOS_SEED"] = str(seed)


def ray_runtime_env(rules_dir: str) -> dict:
    from elastic.chaos.storage import ENV

    return {"env_vars": {"OMP_NUM_THREADS": "1", ENV: rules_dir},
            "worker_process_setup_hook": "elastic.chaos.hooks.storage"}


def node_cluster(workers: int, rules_dir: str):
    """A ray.cluster_utils.Cluster with a CPU-less head (the driver and supervisor) and `workers`
    one-CPU nodes, connected to as this process's Ray. Returns (cluster, close)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(workers):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, runtime_env=ray_runtime_env(rules_dir))

    def close() -> None:
        ray.shutdown()
        c.shutdown()

    return c, close


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory):
    from elastic.chaos.storage import ENV

    d = tmp_path_factory.mktemp("storage-rules")
    os.environ[ENV] = str(d)  # the driver's own filesystems
    return d


@pytest.fixture(scope="module")
def chaos_ray(rules_dir):
    import ray

    from elastic.chaos import procs

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env(str(rules_dir)))
    yield ray
    ray.shutdown()
    left = procs.wait_gone(("WorkerActor", "SupervisorActor", "IDLE", "raylet", "gcs_server"), timeout_s=20)
    assert not left, f"left running after ray.shutdown(): {left}"


@pytest.fixture
def chaos_seed(request):
    """Each test passes its fixed seed through this; CHAOS_SEED or --chaos-seed overrides it."""
    from chaos_tests.harness import seed_or

    def get(default: int) -> int:
        seed = seed_or(default)
        print(f"CHAOS_SEED={seed}  (replay: CHAOS_SEED={seed} python -m pytest '{request.node.nodeid}')")
        return seed

    return get
