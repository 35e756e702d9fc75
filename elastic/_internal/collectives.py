"""The runtime's own collectives: votes, agreements, checkpoint planning and verdicts, state transfer.

They run on the control plane (a gloo group of CPU tensors, whatever backend trains the model) and
call the group object's methods directly, so the group need not be the process's default group
(several ranks can live in one test process). Nothing here pickles: numbers travel as int64 tensors,
structured data as UTF-8 JSON, state as raw bytes.

Every call goes through the collective clock: while it waits, polls report how long (a frozen peer
shows up as a rank blocked in a collective), and a failure marks the generation's group broken, so
that whatever the training function raises afterwards is read as a consequence, not a bug.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist


class CollectiveClock:
    """Marks when this rank entered a collective that has not completed yet (for hang blame)."""

    def __init__(self) -> None:
        self.waiting_since: float | None = None
        # Set when a collective of this generation failed: whatever the training function raises
        # afterwards is a consequence of the broken group, not a bug in user code.
        self.broken = False

    def enter(self) -> None:
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()

    def leave(self) -> None:
        self.waiting_since = None

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        except Exception:
            self.broken = True
            raise
        finally:
            self.leave()


class Pending:
    """An asynchronous collective launched now and completed later (under the clock)."""

    def __init__(self, work: Any, tensor: torch.Tensor, clock: CollectiveClock):
        self._work, self.tensor, self._clock = work, tensor, clock

    def wait(self) -> list[int]:
        with self._clock.timing():
            self._work.wait()
        return [int(v) for v in self.tensor.tolist()]


class Collectives:
    """Collectives on one group object (a ProcessGroup or a gloo backend), CPU tensors only."""

    def __init__(self, pg: Any, clock: CollectiveClock):
        self.pg = pg
        self.clock = clock
        self.rank = pg.rank()
        self.world_size = pg.size()

    # -- integers ----------------------------------------------------------------------------
    def allreduce_max(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        with self.clock.timing():
            self.pg.allreduce([t], _MAX).wait()
        return [int(v) for v in t.tolist()]

    def iallreduce_max(self, values: list[int], out: torch.Tensor | None = None) -> Pending:
        """Launch a MAX allreduce of `values` (into `out`, reused by callers that vote every step)."""
        t = torch.tensor(values, dtype=torch.int64) if out is None else out.copy_(torch.as_tensor(values))
        with self.clock.timing():
            work = self.pg.allreduce([t], _MAX)
        return Pending(work, t, self.clock)

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        mine = torch.tensor(values, dtype=torch.int64)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        with self.clock.timing():
            self.pg.allgather([out], [mine]).wait()
        return [[int(v) for v in t.tolist()] for t in out]

    # -- bytes and JSON ----------------------------------------------------------------------
    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Broadcast a CPU tensor in place from `src`."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        with self.clock.timing():
            self.pg.broadcast([tensor], opts).wait()
        return tensor

    def broadcast_bytes(self, data: bytes | None, src: int) -> bytes:
        n = self.allreduce_max([len(data) if self.rank == src and data is not None else 0])[0]
        buf = torch.empty(n, dtype=torch.uint8)
        if self.rank == src and n:
            assert data is not None
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return bytes(self.broadcast_(buf, src).numpy().tobytes())

    def broadcast_json(self, doc: Any, src: int) -> Any:
        raw = json.dumps(doc).encode() if self.rank == src else None
        return json.loads(self.broadcast_bytes(raw, src).decode())

    def all_gather_json(self, doc: Any) -> list[Any]:
        """Every rank's JSON document, in rank order."""
        raw = json.dumps(doc).encode()
        sizes = [s[0] for s in self.all_gather_ints([len(raw)])]
        n = max(sizes)
        mine = torch.zeros(n, dtype=torch.uint8)
        if raw:
            mine[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        out = [torch.empty(n, dtype=torch.uint8) for _ in range(self.world_size)]
        with self.clock.timing():
            self.pg.allgather([out], [mine]).wait()
        return [json.loads(bytes(t[:s].numpy().tobytes()).decode()) for t, s in zip(out, sizes)]

    # -- point to point ----------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Any:
        with self.clock.timing():
            return self.pg.send([tensor], dst, tag)

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Any:
        with self.clock.timing():
            return self.pg.recv([tensor], src, tag)


def _max() -> Any:
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    return opts


_MAX = _max()
