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
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from elastic import sockets
from elastic.collectives import CollectiveClock, Collectives
from elastic.worker.protocol import Assignment


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


def connect(a: Assignment, clock: CollectiveClock, *, store: Any = None, as_default: bool = True,
            backend: str | None = None) -> ProcessGroups:
    """Join generation `a.generation`: both planes, in the same order on every rank (each is a
    rendezvous). `store`: the base store to use (tests share one in-process store; workers connect
    to the supervisor's). `as_default=False` keeps the process's default group untouched (several
    ranks in one process)."""
    timeout = timedelta(seconds=a.collective_timeout_s)
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
        ctrl_pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{ns}/ctrl", store), a.rank, a.world_size, timeout)
        if as_default:
            if dist.is_initialized():
                dist.destroy_process_group()
            dist.init_process_group(backend or a.backend, store=dist.PrefixStore(f"{ns}/pg", store), rank=a.rank,
                                    world_size=a.world_size, timeout=timeout)
            train = dist.group.WORLD
        else:
            train = dist.ProcessGroupGloo(dist.PrefixStore(f"{ns}/pg", store), a.rank, a.world_size, timeout)
    return ProcessGroups(generation=a.generation, rank=a.rank, world_size=a.world_size, train=train,
                         ctrl=Collectives(ctrl_pg, clock), ckpt_store=dist.PrefixStore(f"{ns}/ckpt", ckpt_base),
                         is_default=as_default, base_store=store, namespace=ns, timeout_s=a.collective_timeout_s,
                         gloo_sockets=set(sockets.socket_fds()) - before)
