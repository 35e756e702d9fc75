"""HSDP (prepare_model(strategy="hsdp")): FSDP2 on a two-dimensional mesh whose rows are the Ray nodes
(dimension 0, "replicate") and whose columns are the ranks' places within a node (dimension 1,
"shard"). Parameters are sharded within a node and replicated across nodes, so a rank's rows are
also held, live, by the rank at the same place on every other node: a lost rank is healed from that
replica, with no buddy copy and no storage read.

`plan_mesh` is the decision, a pure function of the ranks' nodes (unit tested without processes);
`build_mesh` creates the process groups it needs on the training group's store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from elastic._internal import sockets
from elastic._internal.worker.recovery.reshard import Layout

log = logging.getLogger(__name__)
_said: set[str] = set()


@dataclass(frozen=True)
class MeshPlan:
    """How a generation's ranks are laid out for HSDP."""

    rows: tuple[tuple[int, ...], ...]
    """Rank ids by mesh row: one row per node (ordered by its lowest rank, ranks sorted) for HSDP;
    a single row of every rank for the one-dimensional fallback."""
    reason: str = ""
    """Why the mesh is one-dimensional ("" for HSDP)."""

    @property
    def hsdp(self) -> bool:
        return len(self.rows) >= 2

    @property
    def layout(self) -> Layout:
        """Each rank's shard coordinate (its column) and the number of shards (columns)."""
        coords = [0] * sum(len(r) for r in self.rows)
        for row in self.rows:
            for c, rank in enumerate(row):
                coords[rank] = c
        return Layout(len(self.rows[0]), tuple(coords))


def plan_mesh(nodes: Sequence[str]) -> MeshPlan:
    """The mesh for ranks on `nodes` (rank order): HSDP when there are at least two nodes and each
    holds the same number of ranks; otherwise one FSDP dimension over every rank (one node, or uneven
    nodes after a loss: the remaining replicas train on, sharded over all of them)."""
    by_node: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        by_node.setdefault(node, []).append(rank)
    rows = sorted((tuple(sorted(r)) for r in by_node.values()), key=lambda r: r[0])
    flat = (tuple(range(len(nodes))),)
    if len(rows) < 2:
        return MeshPlan(flat, f"the {len(nodes)} ranks are on one node")
    sizes = sorted({len(r) for r in rows})
    if len(sizes) > 1:
        return MeshPlan(flat, f"the nodes hold different numbers of ranks ({sizes})")
    return MeshPlan(tuple(rows))


def say_fallback(plan: MeshPlan) -> None:
    """Log a one-dimensional fallback once per reason in this process."""
    if plan.hsdp or plan.reason in _said:
        return
    _said.add(plan.reason)
    log.warning("strategy='hsdp': %s, so the model is sharded over all of them (FSDP2, one dimension) "
                "until the nodes are even again", plan.reason)


def build_mesh(plan: MeshPlan, rank: int, device: torch.device, timeout_s: float, gloo_sockets: set[int]) -> Any:
    """The 2-D DeviceMesh of `plan` (collective: every rank of the default group creates each row's
    and each column's group, in the same order). The groups get the collective timeout (a frozen peer
    costs seconds, not torch's default half hour), and their connections join `gloo_sockets`, so that
    aborting the generation shuts them down with the others."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    timeout = timedelta(seconds=timeout_s)
    before = set(sockets.socket_fds())
    row_groups = [dist.new_group(list(r), timeout=timeout) for r in plan.rows]
    columns = [[r[c] for r in plan.rows] for c in range(len(plan.rows[0]))]
    col_groups = [dist.new_group(c, timeout=timeout) for c in columns]
    gloo_sockets |= set(sockets.socket_fds()) - before
    row = next(i for i, r in enumerate(plan.rows) if rank in r)
    col = plan.rows[row].index(rank)
    return DeviceMesh.from_group([col_groups[col], row_groups[row]], device.type, mesh=torch.tensor(plan.rows),
                                 mesh_dim_names=("replicate", "shard"))
