"""One generation's process groups, held as objects and passed explicitly: the training plane and
the control plane.

- train: the user's backend (gloo on CPU, NCCL on GPUs). DDP, FSDP and user code use it, nothing
  else. In a worker process it is also the process's default group, so code written for
  torchrun (`dist.get_rank()`, `dist.all_reduce(t)`) works unchanged.
- ctrl: always gloo on CPU tensors, never the default group. Everything the runtime itself
  exchanges goes here (votes, restore agreement, checkpoint planning, state transfer from host
  buffers), so that it works the same under NCCL (which has no CPU collectives) and cannot be
  confused with the user's traffic.

Each generation gets a fresh key space on the rendezvous store (`{prefix}gen{g}/...`): a restarted
rank never reads a stale peer address.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from elastic._internal import sockets
from elastic._internal.collectives import CollectiveClock, Collectives
from elastic.errors import WorkerGroupError
from elastic._internal.protocol import Assignment

ARRIVAL_POLL_S = 0.02
"""How often a rank waiting for its peers to check in looks at the count (and at its abort flag)."""


class RendezvousAbandoned(WorkerGroupError):
    """The generation was given up while this rank waited for its peers: a member died or never
    came, and the supervisor asked the others to leave (or the rendezvous bound passed)."""


@dataclass
class ProcessGroups:
    generation: int
    rank: int
    world_size: int
    train: Any
    """The training group (a ProcessGroup; the process's default group in a worker)."""
    ctrl: Collectives
    """The control plane."""
    ckpt_store: Any
    """This generation's key space for checkpoint commits (a store connection of its own: the
    checkpoint's background thread talks through it while the training thread uses the groups)."""
    is_default: bool = True
    xfer: Collectives | None = None
    """A second gloo group for bulk transfers from a background thread (buddy copies of a sharded
    model): opened on demand by every rank (open_transfer_plane)."""
    base_store: Any = None
    namespace: str = ""
    timeout_s: float = 30.0
    gloo_sockets: set[int] = field(default_factory=set)
    """Inodes of the sockets this process opened while creating the gloo groups (their peer
    connections): what abort() shuts down."""

    def open_transfer_plane(self) -> Collectives:
        """Collective: the transfer group, created the first time every rank asks for it."""
        if self.xfer is None:
            before = set(sockets.socket_fds())
            pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{self.namespace}/xfer", self.base_store), self.rank,
                                       self.world_size, timedelta(seconds=self.timeout_s))
            self.gloo_sockets |= set(sockets.socket_fds()) - before
            self.xfer = Collectives(pg, CollectiveClock())
        return self.xfer

    def abort(self) -> None:
        """This generation is broken: release every peer still blocked in one of its collectives.

        NCCL: the communicator's abort does it. gloo: neither abort() nor shutdown() closes the
        connections (they close when the group is freed in C++, and an FSDP2 model keeps it alive), so
        a rank blocked in a ring collective on a live neighbour that already left would wait until
        its timeout. Shutting this process's connections of the generation down makes every peer's
        pending read on them fail now, and the failure travels around the ring."""
        abort = getattr(self.train, "abort", None)
        if abort is not None:
            with contextlib.suppress(Exception):
                abort()
        self.sever()

    def sever(self) -> list[int]:
        """Shut down this process's connections of this generation's gloo groups; the fds hit."""
        mine = sockets.socket_fds()
        return sockets.shut_down(mine[i] for i in sorted(sockets.established(self.gloo_sockets)) if i in mine)

    def destroy(self) -> None:
        """Drop both groups (collectives still blocked in them are released by their timeout)."""
        if self.is_default and dist.is_initialized():
            dist.destroy_process_group()
        self.train = None
        self.xfer = None


def namespace(a: Assignment) -> str:
    return f"{a.store_prefix}gen{a.generation}"


def arrive(store: Any, ns: str, world_size: int, *, abort: threading.Event | None, timeout_s: float) -> None:
    """Check in, then wait until every rank of the generation has: in short slices, so that a
    generation the supervisor gave up on (a member died before it arrived) is left as soon as the
    supervisor says so (`abort`: this worker's pause flag), and never later than `timeout_s`.

    Only then are the gloo groups created: gloo's own rendezvous waits inside C++ for each peer's
    address with no way out but the store's timeout, so it must start only once every peer is known
    to be alive and on its way (and the store's timeout during it is the detection bound too)."""
    key = f"{ns}/arrived"
    deadline = time.monotonic() + timeout_s
    count = store.add(key, 1)
    while count < world_size:
        if abort is not None and abort.is_set():
            raise RendezvousAbandoned(f"generation {ns} abandoned while {world_size - count} of {world_size} ranks "
                                      "had not arrived")
        if time.monotonic() >= deadline:
            raise RendezvousAbandoned(f"{world_size - count} of {world_size} ranks did not arrive within "
                                      f"{timeout_s:g}s")
        if abort is not None:
            abort.wait(ARRIVAL_POLL_S)
        else:
            time.sleep(ARRIVAL_POLL_S)
        count = store.add(key, 0)


def connect(a: Assignment, clock: CollectiveClock, *, store: Any = None, as_default: bool = True,
            backend: str | None = None, abort: threading.Event | None = None) -> ProcessGroups:
    """Join generation `a.generation`: both planes, in the same order on every rank (each is a
    rendezvous). `store`: the base store to use (tests share one in-process store; workers connect
    to the supervisor's). `as_default=False` keeps the process's default group untouched (several
    ranks in one process). `abort`: set when the supervisor gives this generation up (a member was
    lost while it was being built): the wait for the peers ends at once.

    Every wait here is bounded by `a.rendezvous_timeout_s` (the supervisor's failure-detection
    bound), not by the collective timeout: a peer lost during the rendezvous costs seconds, never
    the collective timeout."""
    timeout = timedelta(seconds=a.collective_timeout_s)
    rdzv = timedelta(seconds=min(a.rendezvous_timeout_s, a.collective_timeout_s))
    if store is None:
        store = dist.TCPStore(a.store_host, a.store_port, is_master=False, timeout=timeout)
        ckpt_base = dist.TCPStore(a.store_host, a.store_port, is_master=False, timeout=timeout)
    else:
        ckpt_base = store
    ns = namespace(a)
    # Every socket opened from here on is a gloo peer connection (or listener) of this generation:
    # the store connections above already exist. Another thread could open one meanwhile; shutting
    # it down later only makes it reconnect or retry (Ray's gRPC, a storage write).
    before = set(sockets.socket_fds())
    with clock.timing():  # a peer dying during the rendezvous breaks this generation, typed
        arrive(store, ns, a.world_size, abort=abort, timeout_s=rdzv.total_seconds())
        # gloo's rendezvous waits for each peer's address with the group's own timeout: created
        # with the rendezvous bound, then given the collective timeout for training.
        ctrl_pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{ns}/ctrl", store), a.rank, a.world_size, rdzv)
        if as_default:
            if dist.is_initialized():
                dist.destroy_process_group()
            dist.init_process_group(backend or a.backend, store=dist.PrefixStore(f"{ns}/pg", store), rank=a.rank,
                                    world_size=a.world_size, timeout=rdzv)
            train = dist.group.WORLD
        else:
            train = dist.ProcessGroupGloo(dist.PrefixStore(f"{ns}/pg", store), a.rank, a.world_size, rdzv)
    for pg in (ctrl_pg, train):
        pg.set_timeout(timeout)
    return ProcessGroups(generation=a.generation, rank=a.rank, world_size=a.world_size, train=train,
                         ctrl=Collectives(ctrl_pg, clock), ckpt_store=dist.PrefixStore(f"{ns}/ckpt", ckpt_base),
                         is_default=as_default, base_store=store, namespace=ns, timeout_s=a.collective_timeout_s,
                         gloo_sockets=set(sockets.socket_fds()) - before)
