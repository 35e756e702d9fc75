"""Unit: a sharded model's buddy exchange inside ctx.commit() (FailureConfig.buddy_overlap off):
host copies stay at 3x the shard with no allocation per step, and a rank lost during an exchange
still leaves one step whole in the survivors' memory. Ranks are threads over real gloo groups
(no Ray, no model: the rows are the live tensors a commit would send)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from elastic._internal.checkpoint.shards import row_chunks
from elastic._internal.collectives import CollectiveClock, Collectives
from elastic._internal.worker.capture import Items
from elastic._internal.worker.recovery.buddy import BuddyCopies
from elastic._internal.worker.recovery.host_slots import ALIGN
from elastic._internal.worker.recovery.reshard import Layout
from elastic._internal.worker.snapshot import Snapshot
from elastic._internal.worker.snapshotter import INLINE_GRACE_S, Snapshotter
from test_reshard import _Killed, _NeverEnding, assert_rank_1_lost_mid_exchange_leaves_step_1_whole
from worker_threads import in_threads

pytestmark = pytest.mark.timeout(60)

SHAPE = (6, 4)


def _rows(o: int, world: int, step: int) -> torch.Tensor:
    a, b = row_chunks(SHAPE[0], world)[o]
    return torch.full((b - a, SHAPE[1]), float(10 * step + o))


def _rank(r: int, world: int, xfer, pause: threading.Event | None = None, timeout_s: float = 10.0,
          shm: bool = False):
    """What one rank of a sharded model needs for take_inline: its services and a Snapshotter; `xfer`
    a transfer plane, or the store on which rank r joins a gloo one of `world` ranks (whose
    collectives wait for a missing peer `timeout_s`). shm: buddies map each other's rows
    (host_slots.py) instead of receiving them."""
    if isinstance(xfer, dist.Store):
        pg = dist.ProcessGroupGloo(dist.PrefixStore("x", xfer), r, world, timedelta(seconds=timeout_s))
        xfer = Collectives(pg, CollectiveClock())
    s = SimpleNamespace(snapshot=Snapshot(), buddy=BuddyCopies(), pause=pause or threading.Event(),
                        clock=CollectiveClock())
    groups = SimpleNamespace(rank=r, world_size=world, xfer=xfer)
    model = SimpleNamespace(sharded=True, replicated=False, layout=Layout.flat(world))
    snaps = Snapshotter(groups, s, model)
    snaps._nodes = ("n",) * world  # one node: rank r's buddy is r + 1
    snaps._mapped = frozenset((w, r) for w in range(world) for r in range(world) if w != r) if shm else frozenset()
    return s, groups, snaps


def _items(live: torch.Tensor, r: int, world: int) -> Items:
    a, _ = row_chunks(SHAPE[0], world)[r]
    return Items(stable=[(("w",), live)], volatile=[], values=[], shards={("w",): (SHAPE, (a, 0))})


@pytest.mark.parametrize("shm", [False, True], ids=["loopback", "shm"])
def test_inline_exchanges_hold_three_copies_of_the_shard_and_allocate_nothing_per_step(shm):
    """2 ranks, 5 commits: each rank's snapshot and copy are of the newest step, its memory is 3x
    its rows (snapshot, copy, the set the next copy arrives in) and no buffer is allocated after the
    second step. shm: 2x, its two slots; the snapshot is the newest slot (no copy of its own), and a
    checkpoint pinning it gets a copy that stays step 5's while steps 6 and 7 overwrite both slots."""
    world, store = 2, dist.HashStore()
    seen: dict = {}
    errors: list = []

    def rank(r: int) -> None:
        try:
            s, _, snaps = _rank(r, world, store, shm=shm)
            live = _rows(r, world, 0)
            allocs = []
            for step in range(1, 6):
                live.copy_(_rows(r, world, step))  # the optimizer's step, in place
                snaps.take_inline(_items(live, r, world), step)
                allocs.append((sum(b.allocations for b in [*s.snapshot._sets, *s.buddy._sets]),
                               sorted(slot.serial for slot in s.buddy.slots._slots.values())))
            shard = live.numel() * live.element_size()
            own = dict(s.snapshot.tensors)[("w",)]
            seen[r] = (s.snapshot.step, own.clone(), s.buddy.complete.step,
                       s.buddy.complete.tensors[("w",)].clone(), (s.snapshot.nbytes + s.buddy.nbytes) / shard,
                       allocs, s.snapshot.previous, s.buddy.error)
            if shm:
                assert own.data_ptr() == s.buddy.slots.rows(5)[("w",)].data_ptr()  # referenced, not copied
                s.snapshot.pin()  # a checkpoint of step 5 writes from it for several steps (Saver's calls)
                ckpt = s.snapshot.checkpoint_state()["w"].chunks[0][1]
                assert ckpt.data_ptr() != own.data_ptr()  # its own copy: the slot is written at step 7
                for step in (6, 7):
                    live.copy_(_rows(r, world, step))
                    snaps.take_inline(_items(live, r, world), step)
                seen[r] += (ckpt.clone(), dict(s.snapshot.tensors)[("w",)].clone())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    in_threads(world, rank, 40)
    assert not errors, errors
    for r in range(world):
        step, own, copy_step, copy, ratio, allocs, previous, error = seen[r][:8]
        assert step == copy_step == 5 and error is None and previous is None
        assert torch.equal(own, _rows(r, world, 5)) and torch.equal(copy, _rows(1 - r, world, 5))
        # shm: each slot is rounded up to host_slots.ALIGN bytes (these rows are 48 bytes)
        assert ratio == (2 * ALIGN / 48 if shm else 3.0), ratio
        assert allocs[1:] == [allocs[1]] * 4, allocs
        if shm:
            ckpt, newest = seen[r][8:]
            assert torch.equal(ckpt, _rows(r, world, 5)) and torch.equal(newest, _rows(r, world, 7))


@pytest.mark.parametrize("shm", [False, True], ids=["loopback", "shm"])
def test_a_rank_killed_during_an_inline_exchange_leaves_one_step_complete_in_memory(shm):
    """3 ranks in a ring: step 1 is exchanged everywhere; during the exchange of step 2 rank 1 dies
    after receiving rank 0's rows and before sending its own. No rank may have given up step 1
    (rank 0's rows of step 1 were only in its snapshot and at rank 1): the survivors hold every
    rank's rows at step 1, and a restore keeps only that step, in no more than 3x the rows."""
    world, store = 3, dist.HashStore()
    services: dict = {}
    errors: list = []

    def rank(r: int) -> None:
        try:
            s, groups, snaps = _rank(r, world, store, timeout_s=3, shm=shm)
            services[r] = s
            live = _rows(r, world, 0)
            for step in (1, 2):
                live.copy_(_rows(r, world, step))
                if step == 2 and r == 1:
                    groups.xfer = _Killed(groups.xfer)
                snaps.take_inline(_items(live, r, world), step)
            live.fill_(-1.0)  # the next optimizer step: the live rows are no longer step 2's
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    in_threads(world, rank, 30)
    assert not errors, errors
    assert_rank_1_lost_mid_exchange_leaves_step_1_whole(services, lambda o: _rows(o, world, 1))


def test_a_pause_during_an_inline_exchange_that_never_ends_leaves_it_behind_within_the_grace():
    """A send to a rank that died mid-transfer never ends by itself: once the supervisor asks the
    rank to pause, the commit leaves the exchange behind after INLINE_GRACE_S and snapshots the step
    beside the one before (the restore chooses between them)."""
    plane, pause = _NeverEnding(), threading.Event()
    s, _, snaps = _rank(0, 2, plane, pause)
    live = _rows(0, 2, 1)
    plane.gate.set()
    snaps.take_inline(_items(live, 0, 2), 1)
    assert s.buddy.error is None and s.snapshot.step == 1 and s.snapshot.previous is None
    plane.gate.clear()
    live.copy_(_rows(0, 2, 2))
    threading.Timer(0.3, pause.set).start()
    t0 = time.monotonic()
    snaps.take_inline(_items(live, 0, 2), 2)
    took = time.monotonic() - t0
    assert 0.3 + INLINE_GRACE_S - 0.05 <= took < 0.3 + INLINE_GRACE_S + 1.0, took
    assert s.buddy.error and s.buddy.complete.step == 1
    assert s.snapshot.step == 2 and s.snapshot.previous[0] == 1
    assert torch.equal(dict(s.snapshot.tensors)[("w",)], _rows(0, 2, 2))
    plane.gate.set()
