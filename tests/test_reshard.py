"""Unit: buddy assignment and rebuilding a sharded state for a new world size, without Ray or a model:
the plan moves exactly the rows each new rank needs, from whoever holds them, and nothing else."""

from __future__ import annotations

import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from elastic._internal.checkpoint.shards import row_chunks
from elastic._internal.collectives import CollectiveClock, Collectives
from elastic._internal.worker.recovery.reshard import Holding, choose, execute, pieces, buddies
from worker_threads import in_threads

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("nodes", [
    ["a", "a", "b", "b"], ["a", "b", "a", "b"], ["a", "a", "a", "b", "b", "b"], ["a"] * 3, ["a", "b", "c"],
    ["a", "a", "b", "c", "c", "d"],
])
def test_buddies_are_a_permutation_on_other_nodes_whenever_possible(nodes):
    b = buddies(nodes)
    assert sorted(b) == list(range(len(nodes))) and all(b[r] != r for r in range(len(nodes)))
    largest = max(nodes.count(n) for n in set(nodes))
    if largest <= len(nodes) / 2:
        assert all(nodes[b[r]] != nodes[r] for r in range(len(nodes))), b


def test_choose_takes_the_newest_step_every_old_rank_is_held_at():
    # Old world 3; old rank 1 died. Rank 0 holds its own rows (steps 7 and 6) and rank 2's copy (6);
    # old rank 2 holds its own (7) and old rank 1's copy, complete at 6 only (7 was on its way).
    holdings = [Holding(0, 3, ((0, 7), (0, 6), (2, 6))), Holding(1, 3, ((2, 7), (1, 6))), Holding(2, 0, ())]
    src = choose(holdings)
    assert src is not None and src.step == 6 and src.holder == {0: 0, 1: 1, 2: 0} and src.values_from == 0
    # Both copies of old rank 1 lost: nothing complete in memory.
    assert choose([Holding(0, 3, ((0, 7), (2, 7))), Holding(1, 3, ((2, 7), (0, 7)))]) is None



def test_two_lost_ranks_whose_buddy_copies_are_a_step_apart_meet_at_the_older_step():
    """Old world 4, old ranks 0 and 2 died as exchanges of step 16 were under way: old rank 0's copy
    (at old rank 1) completed at 16, old rank 2's (at old rank 3) did not. The buddies' previous
    copies (BuddyCopies.previous) make step 15 complete, instead of falling back to storage."""
    holdings = [Holding(0, 4, ((1, 16), (1, 15), (0, 16), (0, 15))), Holding(1, 4, ((3, 16), (3, 15), (2, 15), (2, 14))),
                Holding(2, 0, ()), Holding(3, 0, ())]
    src = choose(holdings)
    assert src is not None and src.step == 15 and src.holder == {0: 0, 1: 0, 2: 1, 3: 1}, src
    # Without the previous copies there is no common step.
    assert choose([Holding(0, 4, ((1, 16), (1, 15), (0, 16))), Holding(1, 4, ((3, 16), (3, 15), (2, 15))),
                   Holding(2, 0, ()), Holding(3, 0, ())]) is None


@pytest.mark.parametrize("old,new", [(2, 3), (3, 2), (4, 3), (3, 4), (2, 2), (4, 1)])
def test_pieces_cover_every_new_row_exactly_once_from_a_holder(old, new):
    rows = [7, 1, 16, 5]
    src = choose([Holding(r, old, ((r, 3),)) for r in range(old)])
    plan = pieces(rows, src, new)
    for i, n in enumerate(rows):
        for dst, (a, b) in enumerate(row_chunks(n, new)):
            got = sorted((p.start, p.stop) for p in plan if p.tensor == i and p.dst == dst)
            covered = [r for s, e in got for r in range(s, e)]
            assert covered == list(range(a, b)), (i, dst, got)
    for p in plan:  # each piece lies inside its old rank's rows, and comes from its holder
        a0, b0 = row_chunks(rows[p.tensor], old)[p.old_rank]
        assert a0 <= p.start < p.stop <= b0 and p.src == src.holder[p.old_rank]


def test_executing_a_plan_over_gloo_rebuilds_each_new_ranks_rows_without_a_full_gather():
    """Old world 3 -> new world 2, old rank 1 lost: new rank 0 holds old ranks 0 and 1 (its buddy
    copy), new rank 1 holds old rank 2. After the transfer every new rank holds exactly its rows."""
    full = [torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3), torch.arange(5, dtype=torch.float64)]
    rows = [t.shape[0] for t in full]

    def old_rows(o: int) -> list[torch.Tensor]:
        return [t[slice(*row_chunks(t.shape[0], 3)[o])].clone() for t in full]

    held = {0: {0: old_rows(0), 1: old_rows(1)}, 1: {2: old_rows(2)}}
    src = choose([Holding(0, 3, ((0, 5), (1, 5))), Holding(1, 3, ((2, 5),))])
    plan = pieces(rows, src, 2)
    store = dist.HashStore()
    out: dict = {}

    def rank(r: int) -> None:
        pg = dist.ProcessGroupGloo(dist.PrefixStore("x", store), r, 2, timedelta(seconds=20))
        targets = [torch.full((b - a, *t.shape[1:]), -1.0, dtype=t.dtype)
                   for t, (a, b) in ((t, row_chunks(t.shape[0], 2)[r]) for t in full)]
        out[r] = (targets, execute(plan, r, held[r], targets, 3, 2, rows, Collectives(pg, CollectiveClock())))

    in_threads(2, rank, 30)
    for r in range(2):
        for t, got in zip(full, out[r][0]):
            a, b = row_chunks(t.shape[0], 2)[r]
            assert torch.equal(got, t[a:b])
    # Each rank received at most its own new rows (no rank gathered a whole tensor).
    for r in range(2):
        own = sum((b - a) * t[0].numel() * t.element_size() for t, (a, b) in
                  ((t, row_chunks(t.shape[0], 2)[r]) for t in full))
        assert out[r][1] <= own


def test_a_settled_exchange_gives_the_previous_copy_up_and_the_next_reuses_its_buffers():
    """Two ranks in one process over gloo, each the other's buddy: after the exchanges of steps 1
    and 2 each holds the other's rows at 2; every rank returned from the exchange of 2, so every
    rank holds 2 and the copy of 1 is given up (release_spare frees its buffers), and the next
    exchange completes as well."""
    from elastic._internal.worker.recovery.buddy import BuddyCopies

    store = dist.HashStore()
    shards = {("w",): ((4, 3), (0, 0))}
    seen: dict = {}
    errors: list = []

    def rank(r: int) -> None:
        try:
            pg = Collectives(dist.ProcessGroupGloo(dist.PrefixStore("b", store), r, 2, timedelta(seconds=20)),
                             CollectiveClock())
            b = BuddyCopies()

            def rows(step: int) -> list:
                return [(("w",), torch.full((2, 3), float(10 * step + r)))]

            for step in (1, 2):
                b.exchange(pg, me=r, world=2, to=1 - r, frm=1 - r, step=step, mine=rows(step), shards=shards,
                           ready=lambda: None, done=lambda: None)
                b.wait(20)
            before = b.nbytes
            b.release_spare()
            seen[r] = {"complete": (b.complete.step, b.complete.tensors[("w",)].clone()),
                       "previous": b.previous, "freed": b.nbytes == before // 2}
            b.exchange(pg, me=r, world=2, to=1 - r, frm=1 - r, step=3, mine=rows(3), shards=shards,
                       ready=lambda: None, done=lambda: None)
            b.wait(20)
            seen[r]["after"] = (b.complete.step, b.previous, b.error)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    in_threads(2, rank, 40)
    assert not errors and len(seen) == 2, errors
    for r in range(2):
        step, t = seen[r]["complete"]
        assert step == 2 and torch.equal(t, torch.full((2, 3), 20.0 + 1 - r))
        assert seen[r]["previous"] is None and seen[r]["freed"] and seen[r]["after"] == (3, None, None)


class _Killed:
    """A rank's transfer plane that dies after posting its receives: nothing it sends goes out, and
    it never reaches the end of the exchange."""

    def __init__(self, inner: Collectives):
        self.recv = inner.recv

    def send(self, *_: object) -> None:
        raise RuntimeError("killed")

    def allreduce_max(self, *_: object) -> None:
        raise RuntimeError("killed")


def test_a_rank_killed_during_an_exchange_leaves_one_step_complete_in_memory():
    """3 ranks in a ring (rank r sends to r + 1), real snapshots and buddy copies over gloo. Step 1 is
    exchanged everywhere; during the exchange of step 2 rank 1 dies after receiving rank 0's rows and
    before sending its own. Rank 0's exchange went through on its side, but rank 0 must not give up
    its own rows of step 1 (only rank 1 held a copy of them) while rank 1's rows of step 2 are lost:
    the survivors still hold every rank's rows at step 1, and a restore keeps only that step
    (no more than 3x this rank's rows)."""
    from elastic._internal.worker.recovery.buddy import BuddyCopies
    from elastic._internal.worker.snapshot import Snapshot
    from elastic._internal.worker.snapshotter import Snapshotter

    world, shape = 3, (6, 4)
    shards = {("w",): (shape, (0, 0))}
    store = dist.HashStore()
    services = [SimpleNamespace(snapshot=Snapshot(), buddy=BuddyCopies(), clock=CollectiveClock(), pause=threading.Event())
                for _ in range(world)]
    errors: list = []

    def rows(o: int, step: int) -> torch.Tensor:
        a, b = row_chunks(shape[0], world)[o]
        return torch.full((b - a, shape[1]), float(10 * step + o))

    def rank(r: int) -> None:
        try:
            pg = dist.ProcessGroupGloo(dist.PrefixStore("k", store), r, world, timedelta(seconds=3))
            xfer = Collectives(pg, CollectiveClock())
            s = services[r]
            groups = SimpleNamespace(rank=r, world_size=world, xfer=xfer)
            snaps = Snapshotter(groups, s, model=None)
            snaps._nodes = ("n",) * world  # one node: rank r's buddy is r + 1
            snaps._mapped = frozenset()  # over the transfer plane (test_buddy_inline: through shared memory)
            for step in (1, 2):
                s.buddy.wait()
                s.snapshot.capture_items([], [(("w",), rows(r, step))], [], step, shards, origin=(r, world),
                                         keep_previous=True)
                if step == 2 and r == 1:
                    groups.xfer = _Killed(xfer)
                snaps.exchange(wait=True)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    in_threads(world, rank, 30)
    assert not errors, errors
    assert_rank_1_lost_mid_exchange_leaves_step_1_whole(services, lambda o: rows(o, 1))


def assert_rank_1_lost_mid_exchange_leaves_step_1_whole(services, rows_at_1) -> None:
    """3 ranks in a ring, rank 1 lost during the exchange of step 2 before sending: ranks 1 and 2
    saw the exchange fail; the survivors (old ranks 0 and 2) hold every rank's rows at step 1 (their
    values: rows_at_1(old rank)), and a restore keeps only that step, in no more than 3x the rows."""
    from elastic._internal.worker.recovery.host_slots import ALIGN
    from elastic._internal.worker.recovery.sharded_state import _held, holding

    assert services[1].buddy.error is not None and services[2].buddy.error is not None  # 1 never sent
    survivors = {0: services[0], 1: services[2]}  # new rank -> what the old ranks 0 and 2 hold
    src = choose([holding(s, new) for new, s in survivors.items()])
    assert src is not None and src.step == 1, [holding(s, new) for new, s in survivors.items()]
    shard = rows_at_1(0).numel() * rows_at_1(0).element_size()
    for new, s in survivors.items():
        s.snapshot.keep(src.step)
        s.buddy.keep(src.step)
        assert s.snapshot.nbytes + s.buddy.nbytes <= 3 * max(shard, ALIGN)  # shm slots: ALIGN-byte rounded
        held = _held(s, src)
        for o, h in src.holder.items():
            if h == new:
                assert torch.equal(held[o][("w",)], rows_at_1(o)), (new, o)


class _Work:
    def __init__(self, gate: threading.Event):
        self.gate = gate

    def wait(self) -> None:
        self.gate.wait(10)


class _NeverEnding:
    """A transfer plane whose sends never end until `gate` opens (gloo's send to a receiver that
    died mid-transfer: it waits out the group's timeout, whatever happens to the connection)."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def recv(self, t: torch.Tensor, *_: object) -> _Work:
        t.fill_(99.0)
        return _Work(_done())

    def send(self, *_: object) -> _Work:
        return _Work(self.gate)

    def allreduce_max(self, values: list) -> list:
        return values


def _done() -> threading.Event:
    e = threading.Event()
    e.set()
    return e


def test_an_exchange_the_group_broke_under_is_left_behind_and_changes_nothing_later():
    """abandon() returns within its grace, calls done() once, keeps the complete copy, and the
    thread left behind changes nothing when its send finally ends."""
    import time

    from elastic._internal.worker.recovery.buddy import BuddyCopies

    shards = {("w",): ((4, 3), (0, 0))}
    b, plane, calls = BuddyCopies(), _NeverEnding(), []
    plane.gate.set()  # step 1 goes through
    b.exchange(plane, me=0, world=2, to=1, frm=1, step=1, mine=[(("w",), torch.ones(2, 3))], shards=shards,
               ready=lambda: None, done=lambda: calls.append(1))
    b.wait(5)
    assert b.complete is not None and b.complete.step == 1 and calls == [1]
    plane.gate.clear()
    b.exchange(plane, me=0, world=2, to=1, frm=1, step=2, mine=[(("w",), torch.ones(2, 3))], shards=shards,
               ready=lambda: None, done=lambda: calls.append(2))
    t0 = time.monotonic()
    assert b.abandon(0.05) and time.monotonic() - t0 < 1.0
    assert calls == [1, 2] and b.error and b.complete.step == 1
    b.wait()  # nothing in flight any more: returns at once
    plane.gate.set()  # the send left behind ends now
    time.sleep(0.2)
    assert calls == [1, 2] and b.complete.step == 1 and b.previous is None and b.error
