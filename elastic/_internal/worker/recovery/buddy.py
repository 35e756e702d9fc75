"""The buddy copy: each rank of a sharded model keeps, in host memory, a copy of one other rank's rows
(its snapshot), so that losing any one rank (or several that are not each other's buddies) loses no
state and no work.

At every snapshot a thread of its own sends this rank's rows to its buddy and receives the rows of
the rank whose buddy it is, on a gloo group of its own (the training thread keeps using the control
plane meanwhile; collectives of two threads on one group could interleave differently on different
ranks). By default the training thread waits for it inside the commit (finish; snapshotter.py says
why); with FailureConfig.buddy_overlap it goes on with the next step. The copy being received goes
to a second buffer set: the newest complete copy stays intact until the next one has fully arrived,
so a failure during the exchange still finds a complete copy one step older. A buddy on the same
host maps the rank's rows instead of receiving them (host_slots.py: one memcpy, no loopback TCP);
everything below holds for it unchanged.

An exchange ends in a collective on that group (`_settle`): a rank that returns from it knows every
rank received its copy of the new step. Only then is the older step given up, here (`previous`) and
in the snapshot (the rank's own rows of the step before, which only this rank and its buddy held).
Without it a rank could drop its older rows as soon as its own send went out, while its buddy died
before the new copy was whole: that rank's rows would then be held at the new step only, the dead
rank's at the older step only, and no step would be complete in memory. With it, either some rank
returned from the collective (then every copy of the new step arrived: the new step is complete
everywhere) or none did (then every rank still holds the older step, its own rows and its copy).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from elastic._internal.checkpoint.shards import row_chunks
from elastic._internal.hostbuf import HostBuffers
from elastic._internal.tree import Path
from elastic._internal.worker.recovery.host_slots import SlotReader, SlotWriter, Spec


@dataclass(frozen=True)
class Copy:
    """A complete copy of another rank's rows."""

    old_rank: int
    old_world: int
    step: int
    tensors: dict[Path, torch.Tensor]
    held: HostBuffers | None = None
    """The buffer set it was received into (None: views of its writer's slot, host_slots.py)."""


class BuddyCopies:
    def __init__(self) -> None:
        self._sets = [HostBuffers(), HostBuffers()]
        self._receiving: HostBuffers | None = None
        self.slots = SlotWriter()
        """This rank's rows for a buddy on the same host."""
        self.maps = SlotReader()
        self.complete: Copy | None = None
        self.previous: Copy | None = None
        """The copy before `complete`, in the other buffer set, until every rank is known to hold its
        copy of `complete`'s step (or an exchange writes there)."""
        self._thread: threading.Thread | None = None
        self._done: Callable[[], None] | None = None
        # Guards the outcome of an exchange against abandon(): a thread left behind changes nothing.
        self._lock = threading.Lock()
        self.error: str | None = None
        self.bytes_sent = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._sets) + self.slots.nbytes

    def wait(self, timeout_s: float | None = None) -> None:
        """Until the exchange in flight ended (complete or failed)."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    def finish(self, stop: threading.Event, grace_s: float) -> bool:
        """Wait for the exchange in flight (an inline one: the training thread waits); once `stop`
        is set, give it `grace_s` more, then leave it behind (abandon). True when every rank holds
        its copy of the exchange's step."""
        t = self._thread
        while t is not None and t.is_alive():
            t.join(0.02)
            if stop.is_set():
                self.abandon(grace_s)
                break
        return self.error is None

    def exchange(self, xfer: Any, *, me: int, world: int, to: int, frm: int, step: int,
                 mine: list[tuple[Path, torch.Tensor]], shards: dict[Path, tuple[tuple[int, ...], tuple[int, ...]]],
                 ready: Callable[[], None], done: Callable[[], None], send: bool = True, recv: bool = True,
                 local_to: bool = False, local_frm: bool = False) -> None:
        """Start sending `mine` (this rank's rows of each sharded tensor, in the agreed order) to rank
        `to` and receiving rank `frm`'s rows, in the background, then settling with every rank.
        `ready()` blocks until `mine` holds the snapshot; `done()` is called when the exchange ended,
        whatever its outcome: `error` is None only when every rank holds its copy of `step`.
        send=False: `to` already holds these rows; recv=False: `complete` already is `frm`'s rows of
        `step` (a survivor in its old place after a restore): only the newcomers' copies move.
        local_to / local_frm: `to` / `frm` is on this host and maps the rows (host_slots.py)."""
        self.wait()
        self.previous = None  # its buffers are the ones this exchange receives into
        specs = self._ward_specs(mine, shards, world, frm)
        self._receiving = self._free_set() if recv and not local_frm else None
        dst = self._receiving.reserve((p, torch.empty(sh, dtype=dt, device="meta")) for p, sh, dt in specs) \
            if self._receiving is not None else {}

        def run() -> None:
            me_ = threading.current_thread()
            try:
                ready()
                got = self._transfer(xfer, me, world, to, frm, step, mine, specs, dst, send, recv, local_to, local_frm)
                with self._lock:
                    if self._thread is not me_:
                        return  # abandoned: the group broke, the older copies stay
                    if recv:  # our ward's rows of `step` are whole here; the older copy stays until every rank's are
                        self.previous = self.complete
                        self.complete = Copy(old_rank=frm, old_world=world, step=step,
                                             tensors={p: got[p] for p, _ in mine}, held=self._receiving)
                    if send:
                        self.bytes_sent += sum(t.numel() * t.element_size() for _, t in mine)
                self._settle(xfer, step)
                with self._lock:
                    if self._thread is me_:
                        self.previous = None  # not needed: every rank holds `step` (its buffers are reused)
                        self.error = None
            except Exception as exc:  # noqa: BLE001 - a broken group: the older copies stay
                with self._lock:
                    if self._thread is me_:
                        self.error = f"{type(exc).__name__}: {exc}"
            finally:
                self._finish(me_)

        self._done = done
        self._thread = threading.Thread(target=run, name=f"elastic-buddy-{step}", daemon=True)
        self._thread.start()

    def _transfer(self, xfer: Any, me: int, world: int, to: int, frm: int, step: int,
                  mine: list[tuple[Path, torch.Tensor]], specs: list[Spec], dst: dict[Path, torch.Tensor],
                  send: bool, recv: bool, local_to: bool, local_frm: bool) -> dict[Path, torch.Tensor]:
        """Send our rows and receive our ward's into `dst` (or the message saying where they are):
        the ward's rows of `step`, once whole here."""
        msg, msg_tag = torch.zeros(5, dtype=torch.int64), len(mine)  # its tag follows the rows'
        works = [xfer.recv(msg, frm, msg_tag)] if recv and local_frm else \
            [xfer.recv(dst[path], frm, tag) for tag, (path, _) in enumerate(mine) if recv and dst[path].numel()]
        if send and local_to:
            works.append(xfer.send(self.slots.write(step, (me, world), mine), to, msg_tag))
        else:
            works += [xfer.send(t, to, tag) for tag, (_, t) in enumerate(mine) if send and t.numel()]
        for w in works:
            w.wait()
        return self.maps.views(msg, specs, step) if recv and local_frm else dst

    @staticmethod
    def _ward_specs(mine: list[tuple[Path, torch.Tensor]],
                    shards: dict[Path, tuple[tuple[int, ...], tuple[int, ...]]], world: int, frm: int) -> list[Spec]:
        """Rank `frm`'s rows of each tensor: shaped by the layout every rank knows."""
        out = []
        for path, t in mine:
            shape, _ = shards[path]
            a, b = row_chunks(shape[0], world)[frm]
            out.append((path, (b - a, *shape[1:]), t.dtype))
        return out

    def _held(self) -> list[HostBuffers]:
        return [c.held for c in (self.complete, self.previous) if c is not None and c.held is not None]

    def _free_set(self) -> HostBuffers:
        """The buffer set no copy lives in (the next copy goes there)."""
        return next(s for s in self._sets if not any(s is h for h in self._held()))

    def _finish(self, thread: threading.Thread) -> None:
        """Call the exchange's done() once: from its thread, or from abandon() (never both)."""
        with self._lock:
            if self._thread is not thread or self._done is None:
                return
            done, self._done = self._done, None
        done()

    def abandon(self, grace_s: float) -> bool:
        """The group broke: give the exchange in flight `grace_s` to end, then leave its thread behind
        (whether it was). It can no longer succeed (its settle needs every rank), but it can wait
        for much longer: gloo never fails a send whose receiver died mid-transfer (it waits out the
        group's timeout, while the connection is already gone, so severing it does not help either),
        and a survivor held here is declared stuck and replaced. What it received goes to buffers
        dropped here; `complete` (and `previous`) stay as they were, and nothing it does later
        counts."""
        t = self._thread
        if t is None:
            return False
        t.join(grace_s)
        with self._lock:
            if not t.is_alive() or self._thread is not t:
                return False
            if self.previous is None and self._receiving is not None:  # the set it receives into
                self._sets = [HostBuffers() if s is self._receiving else s for s in self._sets]  # is not ours any more
            self.error = "abandoned: the group broke during the exchange"
            done, self._done = self._done, None
            self._thread = None
        if done is not None:
            done()
        return True

    @staticmethod
    def _settle(xfer: Any, step: int) -> None:
        """Return once every rank has received its copy of `step` (each enters only then): a MAX
        allreduce, whose result no rank can have before every rank contributed."""
        agreed = xfer.allreduce_max([step])[0]
        if agreed != step:
            raise RuntimeError(f"buddy exchange of step {step} met one of step {agreed}")

    def keep(self, step: int) -> None:
        """Free every copy that is not of `step` (a restore agreed on it: the others are never read).
        """
        self.wait()
        if self.previous is not None and self.previous.step != step:
            self.previous = self._drop(self.previous)
        if self.complete is not None and self.complete.step != step:
            self.complete = self._drop(self.complete)
            if self.previous is not None:  # the older copy is the one kept: it becomes `complete`
                self.complete, self.previous = self.previous, None

    @staticmethod
    def _drop(c: Copy) -> None:
        if c.held is not None:
            c.held.release()

    def release_spare(self, borrowed: dict[Path, torch.Tensor] | None = None) -> None:
        """Free the set that does not hold the complete copy, unless it holds the previous one (a
        copy cut short will never complete), and this rank's slots (a restore moves rows from
        snapshots and copies; the next exchange takes fresh slots), except the one `borrowed` (the
        snapshot's rows) lives in: the snapshot keeps its memory anyway."""
        self.wait()
        for s in self._sets:
            if not any(s is h for h in self._held()):
                s.release()
        self.slots.close(keep=borrowed)
        self.maps.clear()  # a ward's slots live on only in the copies that use them

    @property
    def mapped_bytes(self) -> int:
        """The bytes of the ward's slots this rank's copies map (after the ward's death nothing else
        holds them: a restore counts them as this rank's memory)."""
        return sum(t.numel() * t.element_size() for c in (self.complete, self.previous)
                   if c is not None and c.held is None for t in c.tensors.values())

    def clear(self) -> None:
        self.wait()
        self.complete = self.previous = None
        for s in self._sets:
            s.release()
        self.maps.clear()
