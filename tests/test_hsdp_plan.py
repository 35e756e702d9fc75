"""Unit: HSDP's mesh decision and the recovery plan over replicated layouts, without Ray or a model:
a lost rank's rows come from a live replica, every replica of a new layout gets its rows, and the
plan is the same on every rank."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from elastic._internal.checkpoint.shards import row_chunks
from elastic._internal.collectives import CollectiveClock, Collectives
from elastic._internal.worker.hsdp import plan_mesh
from elastic._internal.worker.recovery.reshard import Holding, Layout, choose, execute, pieces
from elastic._internal.worker.recovery.sharded_state import label
from worker_threads import in_threads

pytestmark = pytest.mark.timeout(60)


def test_even_nodes_make_a_mesh_of_nodes_by_places_within_a_node():
    plan = plan_mesh(["b", "a", "b", "a"])  # node b holds ranks 0 and 2: it is the first row
    assert plan.hsdp and plan.rows == ((0, 2), (1, 3)) and plan.reason == ""
    assert plan.layout == Layout(2, (0, 0, 1, 1))  # rank 1 holds the same rows as rank 0
    assert plan_mesh(["x", "y"]).layout == Layout(1, (0, 0))  # one rank per node: whole replicas


@pytest.mark.parametrize("nodes,why", [(["a", "a"], "one node"), (["a", "a", "b"], "different numbers"),
                                       (["a"], "one node")])
def test_one_node_or_uneven_nodes_fall_back_to_one_fsdp_dimension(nodes, why):
    plan = plan_mesh(nodes)
    assert not plan.hsdp and plan.rows == (tuple(range(len(nodes))),) and why in plan.reason
    assert plan.layout == Layout.flat(len(nodes))


def _kill_case():
    """2 nodes x 2 ranks (coords 0, 1, 0, 1), rank 1 killed at step 9 and replaced: the others hold
    their own rows at 9 and 8 (HSDP keeps one older snapshot); the replacement holds nothing."""
    held = [Holding(0, 2, ((0, 9), (0, 8))), Holding(1, 0, ()), Holding(2, 2, ((0, 9), (0, 8))),
            Holding(3, 2, ((1, 9), (1, 8)))]
    return choose(held), Layout(2, (0, 1, 0, 1))


def test_a_killed_rank_is_healed_from_its_replica_and_nothing_else_moves():
    src, layout = _kill_case()
    assert src is not None and src.step == 9 and src.owners == {0: (0, 2), 1: (3,)}
    plan = pieces([5, 8, 1], src, layout)
    moved = [p for p in plan if p.src != p.dst]
    assert moved and all((p.src, p.dst, p.old_rank) == (3, 1, 1) for p in moved)
    assert label(plan, src, replicated=True) == "replica"
    assert pieces([5, 8, 1], src, layout) == plan  # a pure function of what every rank agreed on


def test_a_rank_whose_replica_is_a_step_behind_meets_it_at_the_older_step():
    """Rank 3 committed 9, its replica (rank 1) was lost: coordinate 0's holders are at 8 and 9
    only if they kept the older snapshot; without it nothing is complete in memory."""
    held = [Holding(0, 2, ((0, 9), (0, 8))), Holding(1, 0, ()), Holding(2, 2, ((0, 9), (0, 8))),
            Holding(3, 2, ((1, 8), (1, 7)))]
    assert choose(held).step == 8
    assert choose([Holding(0, 2, ((0, 9),)), Holding(1, 0, ()), Holding(2, 2, ((0, 9),)),
                   Holding(3, 2, ((1, 8),))]) is None


@pytest.mark.parametrize("old_shards,old_coords,new", [
    (2, (0, 1, 0, 1), Layout(2, (0, 1, 0, 1))),  # the same mesh
    (2, (0, 1, 0, 1), Layout.flat(2)),  # a node lost: one dimension over the remaining ranks
    (2, (0, 1), Layout(2, (0, 1, 0, 1))),  # a node added back: every replica gets its rows
    (3, (0, 1, 2, 0, 1, 2), Layout(2, (0, 1, 0, 1))),
    (1, (0, 0), Layout(3, (0, 1, 2, 0, 1, 2))),
])
def test_every_rank_of_a_replicated_layout_gets_exactly_its_rows_from_a_holder(old_shards, old_coords, new):
    rows = [7, 1, 16, 5]
    src = choose([Holding(r, old_shards, ((c, 3),)) for r, c in enumerate(old_coords)])
    plan = pieces(rows, src, new)
    for i, n in enumerate(rows):
        for dst in range(len(new.coords)):
            got = sorted((p.start, p.stop) for p in plan if p.tensor == i and p.dst == dst)
            assert [r for s, e in got for r in range(s, e)] == list(range(*new.rows(n, dst))), (i, dst, got)
    for p in plan:  # inside its old coordinate's rows, sent by a rank that holds them
        a0, b0 = row_chunks(rows[p.tensor], old_shards)[p.old_rank]
        assert a0 <= p.start < p.stop <= b0 and p.src < len(old_coords) and old_coords[p.src] == p.old_rank
    senders = {p.src for p in plan if p.src != p.dst}
    if len(old_coords) > old_shards and any(p.src != p.dst for p in plan):
        assert len(senders) > 1  # replicas of a coordinate share the sending


def test_executing_a_replica_heal_over_gloo_gives_the_new_rank_its_replicas_rows():
    full = [torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3), torch.arange(5, dtype=torch.float64)]
    rows = [t.shape[0] for t in full]
    src, layout = _kill_case()
    plan = pieces(rows, src, layout)

    def coord_rows(c: int) -> list[torch.Tensor]:
        return [t[slice(*row_chunks(t.shape[0], 2)[c])].clone() for t in full]

    held = {0: {0: coord_rows(0)}, 1: {}, 2: {0: coord_rows(0)}, 3: {1: coord_rows(1)}}
    store = dist.HashStore()
    out: dict = {}

    def rank(r: int) -> None:
        pg = dist.ProcessGroupGloo(dist.PrefixStore("x", store), r, 4, timedelta(seconds=20))
        targets = [torch.full((b - a, *t.shape[1:]), -1.0, dtype=t.dtype)
                   for t, (a, b) in ((t, layout.rows(t.shape[0], r)) for t in full)]
        out[r] = (targets, execute(plan, r, held[r], targets, 2, layout, rows, Collectives(pg, CollectiveClock())))

    in_threads(4, rank, 30)
    for r in range(4):
        for t, got in zip(full, out[r][0]):
            a, b = layout.rows(t.shape[0], r)
            assert torch.equal(got, t[a:b]), r
    assert out[1][1] > 0 and out[0][1] == out[2][1] == out[3][1] == 0  # only the new rank received


@pytest.mark.parametrize("previous,members,want", [
    ([0, 1, 2, 3], [0, 1, 3, 4], [0, 1, 4, 3]),  # rank 2 replaced: rank 3 stays rank 3
    ([0, 1], [1, 2], [2, 1]),  # rank 0 replaced
    ([0, 1, 2], [0, 2], [0, 2]),  # a smaller group: as given
    ([0, 1], [1, 0], [1, 0]),  # the same members: as given
    ([], [3, 4], [3, 4]),
])
def test_at_the_same_world_size_survivors_keep_their_ranks_and_newcomers_fill_the_gaps(previous, members, want):
    from elastic._internal.supervisor.roster import keep_places

    assert keep_places(previous, members) == want


@pytest.mark.parametrize("previous,members,want", [
    ([], [0, 1, 2, 3], [0, 2, 1, 3]),  # Ray put 0 and 2 on node a, 1 and 3 on b: ranks 0-1 on a, 2-3 on b
    ([0, 1], [0, 1, 2, 3], [0, 2, 1, 3]),  # grown: numbered afresh, node by node
    ([0, 2, 1, 3], [0, 2, 4, 3], [0, 2, 4, 3]),  # a rank replaced (here across nodes): places kept
    ([0, 2, 4, 3], [0, 2, 4, 3], [0, 2, 4, 3]),  # the same members again: nobody moves
])
def test_a_group_numbered_afresh_has_each_nodes_ranks_contiguous_whatever_the_placement(previous, members, want):
    """Under HSDP which ranks share a node decides the order of the gradient sums: a fresh numbering
    must not depend on the order in which Ray placed the workers (two runs of the same job would
    differ in the last bit)."""
    from elastic._internal.supervisor.roster import keep_places

    node = {0: "a", 1: "b", 2: "a", 3: "b", 4: "b"}
    assert keep_places(previous, members, node_of=node.get) == want
