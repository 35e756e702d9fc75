"""Buddy copies between two ranks on one host, through shared memory instead of the transfer plane.

On one host a buddy copy need not travel through loopback TCP (0.075-0.1 s for a 146 MB shard here,
on the cores the training uses): the rank writes its rows into memory of its own that its buddy
maps (one memcpy), then sends its buddy a five-number message on the transfer plane saying where
they are. The message is the receive: a buddy that has it knows the rows are whole (the socket
orders the writes before it), and a writer that dies before sending it leaves its buddy's older
copy in place, as a loopback send cut short does.

The rows outlive the writer: its buddy keeps them mapped, which is what a rank killed by SIGKILL or
the OOM killer needs. A lost host takes them along, as it takes a loopback copy held on that host
(buddies sit on other hosts whenever the group spans hosts: reshard.buddies).

The memory is a memfd: anonymous, so nothing is left behind after any crash (it is freed with the
last mapping). The buddy opens it as /proc/<pid>/fd/<fd> while the writer lives; a host where that
is not allowed keeps the loopback exchange (can_map). A writer has two slots and writes step s to
slot s % 2, so that its buddy's complete copy (the other slot) stays whole while the next one is
written, like the two receive buffer sets of the loopback exchange. A writer whose rows change
place (a resize) takes fresh slots: a survivor may still be sending its old rows to a newcomer.

A new slot's first write faults its pages in (146 MB: 0.1 s in a quiet process, 0.17-0.29 s on a
2-rank recovery's first commit here, while the buddy waits, against 0.02 s for a slot that
exists). A standby makes two "blanks" ahead, sized from its rehearsal (SlotWriter.stock): memory
mapped and faulted in at idle priority while it waits, which its first two slots take over
(shrunk to their size).

Slot s % 2 is also the writer's own snapshot of step s (Snapshot.capture_items, `borrowed`): nothing
writes it again before step s + 2, by which time step s + 1 is held everywhere (the exchange settled)
or the group is broken (snapshotter._refuse_unprotected). A checkpoint, which writes from a snapshot
for several steps, copies it out first (Snapshot.checkpoint_state).
"""

from __future__ import annotations

import itertools
import mmap
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from elastic._internal.tree import Path

ALIGN = 64
Spec = tuple[Path, tuple[int, ...], torch.dtype]
"""One tensor's rows in a slot: its path, the rows' shape, dtype (in the order both sides agree on)."""

_serials = itertools.count(1)


def _offsets(specs: list[Spec]) -> tuple[list[int], int]:
    """Each tensor's byte offset in a slot (64-byte aligned), and the slot's size."""
    offs, at = [], 0
    for _, shape, dtype in specs:
        offs.append(at)
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        at += -(-n // ALIGN) * ALIGN
    return offs, max(at, ALIGN)


def _views(buf: mmap.mmap, specs: list[Spec]) -> dict[Path, torch.Tensor]:
    """The slot's tensors over `buf` (each view holds the mapping alive)."""
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    offs, _ = _offsets(specs)
    out = {}
    for (path, shape, dtype), off in zip(specs, offs):
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out[path] = raw[off:off + n].view(dtype).view(shape)
    return out


def can_map(pid: int) -> bool:
    """Whether this process may open process `pid`'s file descriptors (the kernel checks the same
    access for listing them as for opening one)."""
    try:
        os.listdir(f"/proc/{pid}/fd")
        return True
    except OSError:
        return False


def _memory(size: int) -> tuple[int, mmap.mmap]:
    """A memfd of `size` bytes, its pages allocated, and its mapping."""
    fd = os.memfd_create("elastic-buddy", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)  # no room (a small /dev/shm): an error now, not SIGBUS later
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


TOUCH_CHUNK = 64 << 20
"""A blank's pages are faulted in this many bytes at a time, asking go_on() between chunks."""


def _touch(buf: mmap.mmap, go_on: Callable[[], bool]) -> None:
    """Fault in every page of `buf` (one byte written per page) while `go_on()`. By torch, which
    lets go of the GIL (mmap's MAP_POPULATE holds it: 0.36 s for 1 GiB here, with the actor's
    thread waiting to answer a poll)."""
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    page = mmap.PAGESIZE
    for at in range(0, len(buf), TOUCH_CHUNK):
        if not go_on():
            return
        raw[at:at + TOUCH_CHUNK:page].zero_()


@dataclass
class _Blank:
    """Memory made ahead for a slot (SlotWriter.stock)."""

    fd: int
    buf: mmap.mmap
    size: int

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)


class _Slot:
    """One memfd of a writer, mapped, with its tensors' views."""

    def __init__(self, specs: list[Spec], blank: _Blank | None = None):
        """`blank`: memory made ahead (at least this slot's size), taken over and shrunk to it."""
        _, size = _offsets(specs)
        if blank is not None:
            try:
                os.ftruncate(blank.fd, size)  # a reader checks the size; the pages past it are freed
            except BaseException:
                blank.close()
                raise
            self.fd, self.buf = blank.fd, blank.buf
        else:
            self.fd, self.buf = _memory(size)
        self.size = size
        self.specs = specs
        self.serial = next(_serials)
        self.tensors = _views(self.buf, specs)

    def holds(self, tensors: dict[Path, torch.Tensor]) -> bool:
        """Whether `tensors` are views of this slot's tensors (the same memory, path by path)."""
        return all(p in self.tensors and self.tensors[p].data_ptr() == t.data_ptr() for p, t in tensors.items())

    def close(self) -> None:
        """Give up this process's hold: the memory lives on while a buddy maps it."""
        self.tensors = {}
        self.buf = None
        os.close(self.fd)


class SlotWriter:
    """This rank's two slots (by step parity), kept while its rows keep their place and shapes."""

    def __init__(self) -> None:
        self._key: Any = None
        self._slots: dict[int, _Slot] = {}
        self._blanks: list[_Blank] = []

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self._slots.values())

    def write(self, step: int, key: Any, mine: list[tuple[Path, torch.Tensor]]) -> torch.Tensor:
        """Copy `mine` (the rows of `step`, whose place is `key`) into slot step % 2; the message that
        tells the buddy where they are. Rows that already are that slot's (a snapshot borrowing it,
        sent again after a restore) are not copied."""
        specs = [(p, tuple(t.shape), t.dtype) for p, t in mine]
        if key != self._key:
            self.close()
            self._key = key
        slot = self._slots.get(step % 2)
        if slot is None or slot.specs != specs:
            if slot is not None:
                slot.close()
            slot = self._slots[step % 2] = _Slot(specs, self._blank(_offsets(specs)[1]))
        with torch.no_grad():
            for path, t in mine:
                if slot.tensors[path].data_ptr() != t.data_ptr():
                    slot.tensors[path].copy_(t)
        return torch.tensor([os.getpid(), slot.fd, slot.serial, slot.size, step], dtype=torch.int64)

    def stock(self, nbytes: int, count: int = 2, go_on: Callable[[], bool] = lambda: True) -> None:
        """Hold `count` blanks of `nbytes` (a standby, sized by its rehearsal: the rows it will write
        as a rank), made while `go_on()`; blanks of another size go (those of this size stay;
        stock(0) holds none)."""
        keep = [b for b in self._blanks if b.size == nbytes]
        for b in self._blanks:
            if b.size != nbytes:
                b.close()
        self._blanks = keep
        while nbytes > 0 and len(self._blanks) < count and go_on():
            blank = _Blank(*_memory(nbytes), size=nbytes)
            self._blanks.append(blank)
            _touch(blank.buf, go_on)

    def _blank(self, size: int) -> _Blank | None:
        """A blank for a slot of `size` bytes; none fitting: every blank goes (made for rows that
        are not this rank's, they would only hold memory)."""
        fits = [b for b in self._blanks if b.size >= size]
        if fits:
            self._blanks.remove(fits[0])
            return fits[0]
        for b in self._blanks:
            b.close()
        self._blanks = []
        return None

    @property
    def blank_bytes(self) -> int:
        return sum(b.size for b in self._blanks)

    def rows(self, step: int) -> dict[Path, torch.Tensor]:
        """The tensors of the slot `step` was written to (views that keep it mapped, closed or not):
        whole until step + 2 is written there."""
        slot = self._slots.get(step % 2)
        return dict(slot.tensors) if slot is not None else {}

    def holds(self, tensors: dict[Path, torch.Tensor]) -> bool:
        """Whether `tensors` (not empty) are the views of one of these slots."""
        return bool(tensors) and any(s.holds(tensors) for s in self._slots.values())

    def close(self, keep: dict[Path, torch.Tensor] | None = None) -> None:
        """Give up the slots, except the one whose views are `keep` (a snapshot borrows it): a
        survivor restored in its place then points its new buddy at those rows instead of copying
        them into a fresh slot (146 MB: 0.1-0.25 s of a 2-rank recovery here, page faults included),
        and writes its next step's rows into the other."""
        kept = {}
        for parity, s in self._slots.items():
            if keep and s.holds(keep):
                kept[parity] = s
            else:
                s.close()
        self._slots = kept
        if not kept:
            self._key = None


class SlotReader:
    """The ward's slots this rank mapped, by (pid, serial): mapped once, while the ward writes them."""

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], mmap.mmap] = {}

    def views(self, msg: torch.Tensor, specs: list[Spec], step: int) -> dict[Path, torch.Tensor]:
        """The rows a writer's message points at (raises OSError if they cannot be mapped: the
        exchange failed, as a receive cut short would)."""
        pid, fd, serial, size, at = (int(x) for x in msg.tolist())
        if at != step:
            raise RuntimeError(f"buddy exchange of step {step} met a copy of step {at}")
        _, want = _offsets(specs)
        if size != want:
            raise RuntimeError(f"buddy exchange: the ward's slot holds {size} bytes, its rows take {want}")
        key = (pid, serial)
        buf = self._maps.get(key)
        if buf is None:
            f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
            try:
                if os.fstat(f).st_size != size:
                    raise RuntimeError(f"buddy exchange: /proc/{pid}/fd/{fd} is not the ward's slot")
                buf = mmap.mmap(f, size)
            finally:
                os.close(f)
            # A ward has two slots: older mappings live on only in the copies that use them.
            self._maps = dict([*self._maps.items(), (key, buf)][-2:])
        return _views(buf, specs)

    def clear(self) -> None:
        self._maps = {}
