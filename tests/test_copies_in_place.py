"""Unit: after a restore at the same world size, a survivor in its old place keeps its buddy copy,
and the exchange moves only the newcomers' copies (without Ray or a model)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from elastic._internal.collectives import CollectiveClock, Collectives
from elastic._internal.worker.recovery.buddy import BuddyCopies
from elastic._internal.worker.recovery.reshard import Holding, Layout, buddies, choose
from elastic._internal.worker.recovery.sharded_state import copies_in_place
from worker_threads import in_threads

pytestmark = pytest.mark.timeout(60)


def test_only_the_newcomers_ward_copies_move():
    """3 ranks, rank 1 lost and replaced in its place: ranks 0 and 2 still hold their wards' rows
    (buddies [1, 2, 0]: rank 0 keeps rank 2's, rank 2 keeps rank 1's); only rank 1's copy of rank
    0's rows is new. At another world size every copy is new."""
    to = buddies(["a"] * 3)
    assert to == [1, 2, 0]
    src = choose([Holding(0, 3, ((0, 5), (2, 5))), Holding(1, 0, ()), Holding(2, 3, ((2, 5), (1, 5)))])
    assert copies_in_place(src, Layout.flat(3), to) == {0, 2}
    two = choose([Holding(0, 3, ((0, 5), (2, 5))), Holding(1, 3, ((2, 5), (1, 5)))])
    assert copies_in_place(two, Layout.flat(2), buddies(["a"] * 2)) == frozenset()


def test_an_exchange_with_a_copy_in_place_sends_one_way_and_keeps_it():
    """2 ranks after the full exchange of step 4; rank 1 then loses its copy (a newcomer): the
    exchange of the same step with rank 0's copy in place sends rank 0's rows only; rank 0's copy
    is the same object, and rank 1 sends nothing."""
    store = dist.HashStore()
    shards = {("w",): ((4, 3), (0, 0))}
    seen: dict = {}

    def rank(r: int) -> None:
        pg = Collectives(dist.ProcessGroupGloo(dist.PrefixStore("c", store), r, 2, timedelta(seconds=20)),
                         CollectiveClock())
        b = BuddyCopies()
        mine = [(("w",), torch.full((2, 3), float(40 + r)))]
        b.exchange(pg, me=r, world=2, to=1 - r, frm=1 - r, step=4, mine=mine, shards=shards,
                   ready=lambda: None, done=lambda: None)
        b.wait(20)
        if r == 1:
            b.clear()
        before, sent = b.complete, b.bytes_sent
        b.exchange(pg, me=r, world=2, to=1 - r, frm=1 - r, step=4, mine=mine, shards=shards,
                   ready=lambda: None, done=lambda: None, send=r == 0, recv=r == 1)
        b.wait(20)
        seen[r] = (before, b.complete, b.bytes_sent - sent, b.error)

    in_threads(2, rank, 40)
    before, after, sent, error = seen[0]
    assert after is before and sent == 24 and error is None
    before, after, sent, error = seen[1]
    assert before is None and after.step == 4 and torch.equal(after.tensors[("w",)], torch.full((2, 3), 40.0))
    assert sent == 0 and error is None


def test_a_survivor_in_place_points_its_new_buddy_at_the_slot_its_snapshot_borrows():
    """Shared memory: a rank's snapshot of step 5 is its slot 1 (borrowed). A restore releases the
    slots but keeps that one; sending step 5 again (to a newcomer) points at it (same slot, no new
    memfd, its rows not copied onto themselves), and a reader maps step 5's rows there. Step 6 takes
    a fresh slot 0; step 7 writes slot 1 again, in place."""
    import os

    from elastic._internal.worker.recovery.host_slots import SlotReader, SlotWriter

    w = SlotWriter()
    key, spec = (0, 2), [(("w",), (4, 3), torch.float32)]
    for step in (4, 5):
        w.write(step, key, [(("w",), torch.full((4, 3), float(step)))])
    borrowed = w.rows(5)
    two, serial5 = w.nbytes, w._slots[1].serial
    w.close(keep=borrowed)
    assert w.holds(borrowed) and w.nbytes == two // 2 and w.rows(4) == {}
    msg = w.write(5, key, list(borrowed.items()))
    assert int(msg[2]) == serial5 == w._slots[1].serial  # the same memfd, not a fresh one
    assert w.rows(5)[("w",)].data_ptr() == borrowed[("w",)].data_ptr()
    assert torch.equal(SlotReader().views(msg, spec, 5)[("w",)], torch.full((4, 3), 5.0))
    assert int(msg[0]) == os.getpid()
    w.write(6, key, [(("w",), torch.full((4, 3), 6.0))])
    serial = w._slots[1].serial
    w.write(7, key, [(("w",), torch.full((4, 3), 7.0))])
    assert w._slots[1].serial == serial and torch.equal(borrowed[("w",)], torch.full((4, 3), 7.0))
    w.close()
    assert w.nbytes == 0 and not w.holds(borrowed)


def test_a_standby_s_stocked_blanks_become_its_first_two_slots():
    """A standby stocks two blanks (faulted-in memory, sized by its rehearsal); as a rank, its
    first two writes take them over, shrunk to the slot's size (what a reader checks), and a
    reader finds the rows there. Blanks too small for the rows are dropped, not held."""
    from elastic._internal.worker.recovery.host_slots import SlotReader, SlotWriter

    w = SlotWriter()
    key, spec = (1, 2), [(("w",), (4, 3), torch.float32)]
    w.stock(1 << 16)
    assert w.blank_bytes == 2 << 16 and w.nbytes == 0
    for step in (6, 7):
        msg = w.write(step, key, [(("w",), torch.full((4, 3), float(step)))])
        # the blank's mapping (64 KiB), its memfd shrunk to the rows (64 bytes)
        assert len(w._slots[step % 2].buf) == 1 << 16 and int(msg[3]) == 64
        assert torch.equal(SlotReader().views(msg, spec, step)[("w",)], torch.full((4, 3), float(step)))
    assert w.blank_bytes == 0
    w.close()

    w.stock(64)
    w.write(1, key, [(("w",), torch.zeros(40, 3))])  # 480 bytes: no blank fits
    assert w.blank_bytes == 0 and len(w._slots[1].buf) == 512  # a slot of its own
    w.close()
