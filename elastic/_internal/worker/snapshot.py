"""The newest committed state of this rank in host memory: what a survivor hands to newcomers, and
the staging area its checkpoints are written from (one host copy per step, not two).

A copied capture is complete when capture_items() returns, so the training function never runs
while a copy of its tensors is being taken: whatever the loop does next (decaying weights in place
at the top of the next step, through no_grad or .data) cannot leak into the snapshot or into a
checkpoint written from it. On CPU that is a plain copy into reused buffers on the training thread
(memcpy speed: 6-12 ms for 64 MB here). On CUDA the copy runs on a side stream into pinned
buffers and the training stream waits for it before its next kernel: the host does not block, and
readers (a peer transfer, a checkpoint writer, a restore) wait on the copy's event.

Two buffer sets: the newest snapshot lives in one; a checkpoint still writing from it pins it, and
the next capture goes to the other. Host memory is 1x the state while no save is in flight and 2x
while one is; a set that no longer holds the newest snapshot is freed when its save ends.

A sharded rank whose buddy maps its rows (recovery/host_slots.py) has already copied them into its
own slot during the commit: the snapshot references that slot (`borrowed`) and takes a copy of its
own only when a checkpoint reads it (checkpoint_state).

A live capture (FailureConfig.live_snapshots, CPU, replicated state) copies nothing stable: the
snapshot keeps references to the live parameters and optimizer state, which are the committed
step's until the next optimizer.step(). live_guard.py says whether that still holds: held_step() is
-1 once it does not, and a failure then finds no state here (it falls back to a peer or a
checkpoint); a change behind the version counters is logged, and live captures are off for good
in this process (`violation`).
Host memory: the volatile tensors only, plus a checkpoint's staging copy while one is written.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from elastic._internal import tree
from elastic._internal.checkpoint.shards import Shards
from elastic._internal.checkpoint.state import like_template, split_state
from elastic._internal.hostbuf import HostBuffers
from elastic._internal.tree import Path
from elastic._internal.worker.live_guard import LiveGuard


class Snapshot:
    def __init__(self) -> None:
        self.step: int = -1
        self.values: list[tuple[Path, Any]] = []
        self.tensors: list[tuple[Path, torch.Tensor]] = []
        self.shards: dict[Path, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        """Sharded entries (FSDP2): path -> (the whole tensor's shape, the offsets of our rows)."""
        self.origin: tuple[int, int] | None = None
        """(rank, world size) of the generation that took it (a sharded state's rows depend on both)."""
        self.previous: tuple[int, dict[Path, torch.Tensor], list[tuple[Path, Any]], int, frozenset[Path]] | None = None
        """A sharded run keeps the snapshot before the newest one (step, tensors, values, its set, its
        borrowed paths) until
        the newest one's buddy copy has arrived: a failure meanwhile rolls back to it."""
        # Buffer sets, allocated as needed: the newest snapshot's; one a checkpoint still writes from;
        # the snapshot before the newest one while a sharded run's buddy copy is on its way.
        self._sets: list[HostBuffers] = [HostBuffers()]
        self._newest = 0
        self._pinned = [0]
        self._lock = threading.Lock()
        self._cuda_event: Any = None
        self._reserved: tuple[list, tuple[int, int], dict[Path, torch.Tensor], list] | None = None
        self.blocked_s = 0.0
        """Seconds the training thread spent in captures, copies included (benchmarks read it)."""
        self.copy_s = 0.0
        """Seconds spent copying stable tensors (on CUDA: launching the copies)."""
        self.live = False
        """The stable tensors are the live ones (a live capture), valid while their versions hold."""
        self._borrowed: frozenset[Path] = frozenset()
        """The newest snapshot's tensors that live in memory it does not own (capture_items)."""
        self._guard = LiveGuard()

    @property
    def empty(self) -> bool:
        return self.step < 0

    @property
    def violation(self) -> str | None:
        """Set when a live tensor changed without its version counter moving: live captures are off
        for good in this process (they are taken as copies), and the live snapshot is not used."""
        return self._guard.violation

    @property
    def nbytes(self) -> int:
        """Host memory held by the snapshot's buffers (both sets)."""
        return sum(s.nbytes for s in self._sets)

    @property
    def borrowed(self) -> dict[Path, torch.Tensor]:
        """The newest snapshot's tensors that live in memory it references (host_slots.py)."""
        return {p: t for p, t in self.tensors if p in self._borrowed}

    @property
    def borrowed_nbytes(self) -> int:
        """Bytes of the newest snapshot that live in memory it references, not in its buffers."""
        return sum(t.numel() * t.element_size() for p, t in self.tensors if p in self._borrowed)

    def held_step(self) -> int:
        """The step whose state this snapshot holds; -1 for none (never taken, or live tensors that
        changed since their capture: an optimizer.step() ran after the commit, or a change their
        version counters could not see, which is logged as an error)."""
        if self.live and not self._guard.intact(self.step):
            return -1
        return self.step

    # -- capturing --------------------------------------------------------------------------
    def capture(self, sd: dict[str, Any], step: int) -> None:
        """Copy a whole state dict now (restore from a checkpoint; tests)."""
        tensors, values = split_state(sd)
        self.capture_items([], tree.tensor_leaves(tensors), values, step)
        self.wait()

    def capture_items(self, stable: list[tuple[Path, torch.Tensor]], volatile: list[tuple[Path, torch.Tensor]],
                      values: list[tuple[Path, Any]], step: int,
                      shards: dict[Path, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
                      origin: tuple[int, int] | None = None, keep_previous: bool = False,
                      live: bool = False, borrowed: dict[Path, torch.Tensor] | None = None) -> None:
        """Take a snapshot of `step`: every tensor is copied before this returns (on CUDA: before
        the current stream's next kernel), or, when `live`, the stable ones are referenced as they
        are (a copy once a violation was seen). `borrowed`: tensors holding this step's values where
        nothing writes before step + 2 (our rows in our buddy slot): referenced, not copied."""
        t0 = time.perf_counter()
        self.wait()  # the previous capture is complete before a new one starts
        live = live and self._guard.sound(stable, self.step)
        borrowed = borrowed or {}
        order = [p for p, _ in volatile] + [p for p, _ in stable]
        if borrowed:  # (unfiltered otherwise: _stable_buffers knows the same list again)
            volatile = [(p, t) for p, t in volatile if p not in borrowed]
            stable = [(p, t) for p, t in stable if p not in borrowed]
        with self._lock:
            if keep_previous and self.step >= 0 and self.previous is None:
                self._pinned[self._newest] += 1
                self.previous = (self.step, dict(self.tensors), list(self.values), self._newest, self._borrowed)
            target = self._free_set()
            bufs = self._sets[target]
            # Live: this set keeps no stable buffers (the staging copy of the last checkpoint goes);
            # nor buffers for the borrowed tensors.
            owned = [p for p in order if p not in borrowed]
            host = dict(bufs.copy_in(volatile, keep=[p for p, _ in volatile] if live else owned))
            host.update(borrowed)
            self._borrowed = frozenset(borrowed)
            pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
            if live:
                host.update(self._guard.refs)
            else:
                stable_dst, pairs = self._stable_buffers(stable, target, bufs)
                host.update(stable_dst)
                self._guard.forget()
            self.live = live
            self.tensors = [(p, host[p]) for p in order]
            self.values = values
            self.shards = shards or {}
            self.origin = origin
            self.step = step
            self._newest = target
            for i, s in enumerate(self._sets):
                if i != target and self._pinned[i] == 0:
                    s.release()  # 1x the state while nothing else needs an older copy
        if pairs:
            self._copy(pairs)
        self.blocked_s += time.perf_counter() - t0

    def _stable_buffers(self, stable: list[tuple[Path, torch.Tensor]], target: int,
                        bufs: HostBuffers) -> tuple[dict[Path, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Set `target`'s buffers for the stable tensors, and the (buffer, tensor) pairs to copy. The
        same plan into the same set as last time: the same buffers (no lookups)."""
        cached = self._reserved
        if cached is not None and cached[0] is stable and cached[1] == (target, bufs.version):
            return cached[2], cached[3]
        stable_dst = bufs.reserve(stable)
        pairs = [(stable_dst[p], t.detach()) for p, t in stable]
        self._reserved = (stable, (target, bufs.version), stable_dst, pairs)
        return stable_dst, pairs

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy now: the training function must not run while its tensors are being read (an in-place
        change before its next optimizer.step() would leak into this step's snapshot)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            if pairs[0][1].is_cuda:
                # On the current stream, into pinned buffers: its later kernels (whatever the loop
                # launches next) are ordered after the copy; the host does not wait.
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                self._cuda_event = torch.cuda.Event()
                self._cuda_event.record()
            else:
                for dst, src in pairs:
                    dst.copy_(src)
        self.copy_s += time.perf_counter() - t0

    def _free_set(self) -> int:
        """The set the next capture writes to: the newest one if nothing holds it, else an idle one
        (one more is added when every set is held)."""
        if self._pinned[self._newest] == 0:
            return self._newest
        for i, n in enumerate(self._pinned):
            if n == 0:
                return i
        self._sets.append(HostBuffers())
        self._pinned.append(0)
        return len(self._sets) - 1

    # -- waiting ----------------------------------------------------------------------------
    def waiter(self) -> Any:
        """A callable that blocks until the capture taken now is complete in host memory (for
        another thread: a checkpoint writer). Only a CUDA copy can still be in flight."""
        event = self._cuda_event

        def wait() -> None:
            if event is not None:
                event.synchronize()

        return wait

    def wait(self) -> None:
        """Block until the newest capture is complete in host memory."""
        if self._cuda_event is not None:
            self._cuda_event.synchronize()
            self._cuda_event = None

    # -- checkpoints write from the snapshot --------------------------------------------------
    def pin(self) -> int:
        """Keep the newest set as it is until unpin() (a checkpoint writes from it)."""
        with self._lock:
            self._pinned[self._newest] += 1
            return self._newest

    def release_previous(self, *, keep_buffers: bool = False) -> None:
        """The newest snapshot is safe elsewhere too (its buddy copy arrived): the one before it goes.
        keep_buffers: its set keeps its memory for the next capture (which needs one then anyway:
        a fresh 146 MB allocation costs about 8x the copy into it here)."""
        with self._lock:
            prev, self.previous = self.previous, None
        if prev is not None:
            self.unpin(prev[3], keep_buffers=keep_buffers)

    def keep(self, step: int) -> None:
        """Hold only `step` of the newest snapshot and the one before it (a restore agreed on it):
        the other's set is freed unless a checkpoint still writes from it."""
        with self._lock:
            prev = self.previous
            if prev is None or step not in (self.step, prev[0]) or self.step == prev[0]:
                return
            if step == prev[0]:  # back to the older snapshot: it becomes the newest
                dropped = self._newest
                self.step, self.tensors, self.values, self._newest = prev[0], list(prev[1].items()), prev[2], prev[3]
                self._borrowed = prev[4]
                self.previous = None
                self._pinned[prev[3]] -= 1  # pinned as `previous`; the newest is held by being newest
                if self._pinned[dropped] == 0:
                    self._sets[dropped].release()
                return
        self.release_previous()

    def unpin(self, which: int, *, keep_buffers: bool = False) -> None:
        with self._lock:
            self._pinned[which] -= 1
            if self._pinned[which] == 0 and which != self._newest and not keep_buffers:
                self._sets[which].release()

    # -- reading ----------------------------------------------------------------------------
    def load(self, tensors: list[tuple[Path, torch.Tensor]], values: list[tuple[Path, Any]], step: int) -> None:
        """Hold a state received from a peer (its tensors are kept as given)."""
        self.wait()
        with self._lock:
            self.tensors, self.values, self.step = list(tensors), list(values), step
            self.live = False
            self._borrowed = frozenset()
            self._guard.forget()

    def checkpoint_state(self) -> dict[str, Any]:
        """The state to checkpoint, reading from the buffers (a CUDA copy may still be filling them:
        the writer waits with waiter()); sharded entries as Shards of this rank's rows. A writer
        reads it for several steps: borrowed tensors, whose memory is written again at step + 2, are
        copied into the newest set first."""
        self._guard.require(self.step, live=self.live)
        with self._lock:
            if self._borrowed:
                got = dict(self._sets[self._newest].copy_in(
                    [(p, t) for p, t in self.tensors if p in self._borrowed], keep=[p for p, _ in self.tensors]))
                self.tensors = [(p, got.get(p, t)) for p, t in self.tensors]
                self._borrowed = frozenset()
        return tree.build([*((p, Shards(self.shards[p][0], [(self.shards[p][1], t)]) if p in self.shards else t)
                             for p, t in self.tensors), *self.values])

    def state_dict(self, like: dict[str, Any] | None = None) -> dict[str, Any]:
        """A dict that reads from the snapshot's buffers (loaders copy out of it). `like`: a state
        of the same program, whose tuples (Adam's betas) the JSON values get back."""
        if self.empty:
            raise RuntimeError("no snapshot taken yet")
        self.wait()
        self._guard.require(self.step, live=self.live)
        sd = tree.build([*self.tensors, *self.values])
        return like_template(like, sd) if like is not None else sd

    def clear(self) -> None:
        self.wait()
        self.step = -1
        self.values, self.tensors = [], []
        self.live = False
        self._borrowed = frozenset()
        self._guard.reset()
        self.previous = None
        self._pinned = [0] * len(self._sets)
        for s in self._sets:
            s.release()
