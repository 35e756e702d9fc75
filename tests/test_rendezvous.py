"""Unit: the rendezvous store listens on the node's address only, under an unguessable prefix."""

from __future__ import annotations

import socket
import subprocess

import pytest

from elastic._internal.supervisor.actor import bind_store, new_store_prefix

pytestmark = pytest.mark.timeout(30)


def _other_address() -> str | None:
    """An address of this machine other than loopback (None when it has none)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return next((a for a in out if ":" not in a and not a.startswith("127.")), None)


def test_the_store_listens_on_the_given_address_only():
    store, sock = bind_store("127.0.0.1", 5.0)
    port = store.port
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the node's address: reachable
    other = _other_address()
    if other is None:
        pytest.skip("this machine has no address besides loopback to try")
    with pytest.raises(OSError):
        socket.create_connection((other, port), timeout=2)  # any other interface: refused
    del store, sock


def test_every_run_gets_a_fresh_unguessable_prefix():
    prefixes = {new_store_prefix() for _ in range(3)}
    assert len(prefixes) == 3 and all(len(p) == 33 and p.endswith("/") for p in prefixes)  # 128 random bits


def _assignment(world: int, rank: int, port: int, **kw):
    from elastic._internal.protocol import Assignment

    return Assignment(generation=0, rank=rank, world_size=world, store_host="127.0.0.1", store_port=port,
                      backend="gloo", collective_timeout_s=30.0, **kw)


@pytest.mark.parametrize("how", ["abandoned", "bound"])
def test_a_rank_whose_peer_never_arrives_leaves_the_rendezvous_when_told_or_at_its_bound(how):
    """A member lost while its generation is built: the others leave its rendezvous as soon as the
    supervisor asks them to pause, or at the rendezvous bound — never at the 30 s collective timeout
    (the wait gloo's own rendezvous would have)."""
    import threading
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from elastic._internal.collectives import CollectiveClock
    from elastic._internal.worker.groups import RendezvousAbandoned, connect

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    abort = threading.Event()
    if how == "abandoned":
        threading.Timer(0.3, abort.set).start()
    clock = CollectiveClock()
    t0 = time.monotonic()
    with pytest.raises(RendezvousAbandoned):
        connect(_assignment(2, 0, server.port, rendezvous_timeout_s=1.5), clock, as_default=False, abort=abort)
    took = time.monotonic() - t0
    assert (0.3 <= took < 1.0) if how == "abandoned" else (1.5 <= took < 2.5), took
    assert clock.broken  # read as a broken group (the worker parks), not as a user error


def test_a_generation_whose_ranks_all_arrive_trains_with_the_collective_timeout():
    """Groups are created under the rendezvous bound and then given the collective timeout."""
    import threading
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from elastic._internal.collectives import CollectiveClock
    from elastic._internal.worker.groups import connect

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    out: dict[int, object] = {}

    def rank(r: int) -> None:
        g = connect(_assignment(2, r, server.port, rendezvous_timeout_s=2.0), CollectiveClock(), as_default=False)
        t = torch.ones(1)
        g.train.allreduce([t]).wait()
        out[r] = (float(t), g.train.options._timeout, g.ctrl.pg.options._timeout)

    ts = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in ts]
    [t.join(timeout=20) for t in ts]
    assert out[0] == out[1] == (2.0, timedelta(seconds=30), timedelta(seconds=30)), out
