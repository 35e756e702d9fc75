"""A rank leaving a broken gloo generation releases the peers still blocked on it (real processes).

The chain: rank 0 waits to receive from rank 1, rank 1 waits to receive from rank 2, and rank 2 is
SIGKILLed. Rank 1's receive fails at once (the kernel closed the dead rank's sockets); rank 0's
peer, rank 1, is alive and still holds its gloo group, so without ProcessGroups.abort() shutting
rank 1's connections down, rank 0 would wait for the whole collective timeout (60 s here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.timeout(90)

WORKER = textwrap.dedent("""
    import json, os, sys, time
    import torch, torch.distributed as dist
    from elastic._internal.collectives import CollectiveClock
    from elastic._internal.worker.groups import connect
    from elastic._internal.protocol import Assignment

    rank, port = int(sys.argv[1]), int(sys.argv[2])
    a = Assignment(generation=0, rank=rank, world_size=3, store_host="127.0.0.1", store_port=port,
                   backend="gloo", collective_timeout_s=60.0)
    g = connect(a, CollectiveClock())
    print(json.dumps({"ready": rank, "sockets": len(g.gloo_sockets)}), flush=True)
    if rank == 2:
        time.sleep(3600)  # killed by the test
    t0 = time.monotonic()
    try:
        g.train.recv([torch.zeros(1)], rank + 1, 0).wait()
        out = {"rank": rank, "error": None}
    except Exception as exc:  # noqa: BLE001
        out = {"rank": rank, "error": type(exc).__name__}
    out["waited_s"] = time.monotonic() - t0
    if rank == 1:
        g.abort()  # what the runtime does when a rank parks because its generation broke
    print(json.dumps(out), flush=True)
    time.sleep(70 if rank == 1 else 0)  # rank 1 stays alive, holding its group, like a parked rank
    os._exit(0)
""")


def _read_json(p: subprocess.Popen, deadline: float) -> dict:
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited: {p.stderr.read()}")
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError("no answer in time")


def test_a_rank_leaving_a_broken_generation_releases_the_peer_blocked_on_it() -> None:
    """(With rank 1 not calling abort(), rank 0 waited 60.0 s: the mutation run of this test.)"""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(store.port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(3)]
    try:
        deadline = time.monotonic() + 60
        ready = [_read_json(p, deadline) for p in procs]
        # Each rank opened its gloo peer connections (two groups, two peers) after the store's.
        assert all(r["sockets"] >= 4 for r in ready), ready
        time.sleep(0.5)  # let ranks 0 and 1 enter their receives
        procs[2].send_signal(signal.SIGKILL)
        one = _read_json(procs[1], time.monotonic() + 20)
        zero = _read_json(procs[0], time.monotonic() + 20)
        assert one["error"] is not None and one["waited_s"] < 10
        # Released by rank 1's abort within seconds, not by the 60 s timeout.
        assert zero["error"] is not None and zero["waited_s"] < one["waited_s"] + 5, (zero, one)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
