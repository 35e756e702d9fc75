"""The Ray each bench_sharded run trains on: one local instance for the single-node arms, and a fresh
two-node ray.cluster_utils.Cluster for each HSDP run (HSDP shards within a node and replicates across
nodes, so its ranks must be spread evenly over two or more Ray nodes). The arms are interleaved, so
the session switches between the two as each run needs.

The two nodes are processes of this one host. Each has exactly as many CPUs as it holds ranks
(world / 2, one CPU per rank), which forces the even spread; the head's driver and elastic's
supervisor reserve none, and the node standbys reserve none either (memory only).
"""

from __future__ import annotations

from typing import Any

NODES = 2
ENV = {"env_vars": {"OMP_NUM_THREADS": "1"}}


class RaySession:
    """Which Ray this process is connected to, switched on demand."""

    def __init__(self, local_cpus: int):
        self.local_cpus = local_cpus
        self.cluster: Any = None
        self.kind = ""

    def local(self) -> None:
        """Connect to the local single-node instance (kept across runs: starting one costs seconds)."""
        import ray

        if self.kind == "local":
            return
        self.close()
        ray.init(num_cpus=self.local_cpus, include_dashboard=False, log_to_driver=False, runtime_env=ENV)
        self.kind = "local"

    def two_nodes(self, world: int) -> None:
        """A fresh two-node Cluster with world / 2 CPUs per node, connected to (fresh per run: a
        previous run's standbys and actors are gone with it)."""
        import ray
        from ray.cluster_utils import Cluster

        if world % NODES:
            raise ValueError(f"HSDP needs the ranks spread evenly over {NODES} nodes: --ranks {world} is odd")
        self.close()
        per_node = world // NODES
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node,
                                                                     "include_dashboard": False})
        for _ in range(NODES - 1):
            self.cluster.add_node(num_cpus=per_node)  # from the main thread: Cluster installs signal handlers
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False, runtime_env=ENV)
        self.kind = "cluster"

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        self.kind = ""
