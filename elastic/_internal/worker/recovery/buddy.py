"""The buddy copy: each rank of a sharded model keeps, in host memory, a copy of one other rank's rows
(its snapshot), so that losing any one rank (or several that are not each other's buddies) loses no
state and no work.

After every snapshot a background thread sends this rank's rows to its buddy and receives the rows
of the rank whose buddy it is, on a gloo group of its own (the training thread keeps using the
control plane meanwhile; collectives of two threads on one group could interleave differently on
different ranks). The copy being received goes to a second buffer set: the newest complete copy
stays intact until the next one has fully arrived, so a failure during the exchange still finds a
complete copy one step older. That older copy is also kept (`previous`) until the next exchange
starts writing over it: when two ranks die, their buddies' newest copies may be one step apart (one
exchange had finished, the other was cut short), and the older step is then the newest one at which
every lost rank's rows are still held.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from elastic._internal.checkpoint.shards import row_chunks
from elastic._internal.hostbuf import HostBuffers
from elastic._internal.tree import Path


@dataclass(frozen=True)
class Copy:
    """A complete copy of another rank's rows."""

    old_rank: int
    old_world: int
    step: int
    tensors: dict[Path, torch.Tensor]


class BuddyCopies:
    def __init__(self) -> None:
        self._sets = [HostBuffers(), HostBuffers()]
        self._next = 0
        self.complete: Copy | None = None
        self.previous: Copy | None = None
        """The copy before `complete`, in the other buffer set, until an exchange writes there."""
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.bytes_sent = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._sets)

    def wait(self, timeout_s: float | None = None) -> None:
        """Until the exchange in flight ended (complete or failed)."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def exchange(self, xfer: Any, *, me: int, world: int, to: int, frm: int, step: int,
                 mine: list[tuple[Path, torch.Tensor]], shards: dict[Path, tuple[tuple[int, ...], tuple[int, ...]]],
                 ready: Callable[[], None], done: Callable[[], None]) -> None:
        """Start sending `mine` (this rank's rows of each sharded tensor, in the agreed order) to rank
        `to` and receiving rank `frm`'s rows, in the background. `ready()` blocks until `mine` holds
        the snapshot; `done()` is called when the exchange ended, whatever its outcome."""
        self.wait()
        self.previous = None  # its buffers are the ones this exchange receives into
        target = self._sets[self._next]
        # Where rank `frm`'s rows of each tensor go: shaped by the layout every rank knows.
        recv_specs = []
        for path, t in mine:
            shape, _ = shards[path]
            a, b = row_chunks(shape[0], world)[frm]
            recv_specs.append((path, torch.empty((b - a, *shape[1:]), dtype=t.dtype, device="meta")))
        dst = target.reserve(recv_specs)

        def run() -> None:
            try:
                ready()
                works = [xfer.recv(dst[path], frm, tag) for tag, (path, _) in enumerate(mine) if dst[path].numel()]
                works += [xfer.send(t, to, tag) for tag, (_, t) in enumerate(mine) if t.numel()]
                for w in works:
                    w.wait()
                self.previous = self.complete
                self.complete = Copy(old_rank=frm, old_world=world, step=step,
                                     tensors={p: dst[p] for p, _ in mine})
                self.bytes_sent += sum(t.numel() * t.element_size() for _, t in mine)
                self._next = 1 - self._next  # the next copy goes to the other set
                self.error = None
            except Exception as exc:  # noqa: BLE001 - a broken group: the older copy stays
                self.error = f"{type(exc).__name__}: {exc}"
            finally:
                done()

        self._thread = threading.Thread(target=run, name=f"elastic-buddy-{step}", daemon=True)
        self._thread.start()

    def release_spare(self) -> None:
        """Free the set that does not hold the complete copy, unless it holds the previous one (a
        copy cut short will never complete)."""
        self.wait()
        if self.previous is None:
            self._sets[self._next].release()

    def clear(self) -> None:
        self.wait()
        self.complete = self.previous = None
        for s in self._sets:
            s.release()
