"""Faults inflicted on a run from outside it: signals to a worker, node loss and gain, a corrupted
shard, the supervisor or the driver killed.

Each kind is one enum value with one implementation (`inflict`). In-process faults, which a rank
inflicts on itself at a step, are in `faults.py`; storage errors and latency are rules of the
`chaosfs::` filesystem (`storage.py`). The caller claims a marker (faults.claim) before inflicting,
so every fault is recorded exactly once with its time.
"""

from __future__ import annotations

import enum
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

from elastic.chaos import procs
from elastic._internal.checkpoint.layout import CHECKPOINTS_DIR, step_dirname
from elastic._internal.storage import join, resolve


class ExternalKind(str, enum.Enum):
    KILL = "kill"  # SIGKILL a worker: OOM killer, host crash
    SEGV = "segv"  # SIGSEGV to a worker: a native crash
    SIGTERM = "sigterm"  # a spot VM's preemption notice to a worker
    STOP = "stop"  # SIGSTOP a worker: frozen, sockets open
    NODE_REMOVE = "node_remove"  # a Ray node (and every worker on it) disappears
    NODE_WORKERS = "node"  # every worker on one node SIGKILLed at once: a host lost, seen from a real cluster
    NODE_ADD = "node_add"  # a Ray node joins
    CORRUPT_SHARD = "corrupt_shard"  # flip bytes in a committed checkpoint's shard (same size)
    KILL_SUPERVISOR = "kill_supervisor"  # SIGKILL the supervisor actor's process
    KILL_DRIVER = "kill_driver"  # SIGKILL the driver process (`elastic run` / a script)

    @property
    def targets_worker(self) -> bool:
        return self in SIGNALS


SIGNALS = {ExternalKind.KILL: signal.SIGKILL, ExternalKind.SEGV: signal.SIGSEGV,
           ExternalKind.SIGTERM: signal.SIGTERM, ExternalKind.STOP: signal.SIGSTOP}


@dataclass
class Target:
    """What a fault acts on; only the fields its kind needs are set."""

    pid: int | None = None
    """A worker's PID (signal kinds)."""
    pids: tuple[int, ...] = ()
    """Every worker PID on one node (node)."""
    cluster: Any = None
    """A ray.cluster_utils.Cluster (node kinds)."""
    node_id: str | None = None
    """The node to remove (hex id); None: a non-head node hosting no supervisor."""
    num_cpus: int = 1
    """CPUs of an added node."""
    uri: str | None = None
    """The run's URI (corrupt_shard)."""
    step: int | None = None
    """The committed step whose shard to corrupt."""
    driver: subprocess.Popen | None = None
    """The driver process (kill_driver)."""


def inflict(kind: ExternalKind, target: Target) -> str:
    """Inflict `kind` on `target`; a one-line description of what was done."""
    if kind in SIGNALS:
        assert target.pid is not None, f"{kind.value} needs a worker pid"
        os.kill(target.pid, SIGNALS[kind])
        return f"{SIGNALS[kind].name} -> pid {target.pid}"
    if kind is ExternalKind.NODE_WORKERS:
        assert target.pids, "node needs the PIDs of the node's workers"
        for pid in target.pids:  # back to back: the ranks of a lost host die within microseconds
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return f"SIGKILL -> pids {', '.join(map(str, target.pids))} (one node)"
    if kind is ExternalKind.NODE_REMOVE:
        node = find_node(target.cluster, target.node_id)
        target.cluster.remove_node(node, allow_graceful=False)
        return f"removed node {node.unique_id[:8]}"
    if kind is ExternalKind.NODE_ADD:
        node = target.cluster.add_node(num_cpus=target.num_cpus)
        return f"added node {node.unique_id[:8]} ({target.num_cpus} CPUs)"
    if kind is ExternalKind.CORRUPT_SHARD:
        assert target.uri is not None and target.step is not None
        return corrupt_shard(target.uri, target.step)
    if kind is ExternalKind.KILL_SUPERVISOR:
        # Ours first (a local Ray started by this process); else anywhere on this machine.
        sups = procs.actor_processes("SupervisorActor") or procs.actor_processes("SupervisorActor", everywhere=True)
        if target.pid is not None:
            sups = [p for p in sups if p.pid == target.pid]
        if len(sups) != 1:
            raise RuntimeError(f"expected one supervisor process, found {[p.pid for p in sups]}")
        os.kill(sups[0].pid, signal.SIGKILL)
        return f"SIGKILL -> supervisor pid {sups[0].pid}"
    if kind is ExternalKind.KILL_DRIVER:
        assert target.driver is not None
        target.driver.kill()
        return f"SIGKILL -> driver pid {target.driver.pid}"
    raise ValueError(f"unknown external fault {kind!r}")


def find_node(cluster: Any, node_id: str | None) -> Any:
    workers = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
    if node_id is not None:
        for n in workers:
            if node_id in (getattr(n, "node_id", None), getattr(n, "unique_id", None)):
                return n
        raise RuntimeError(f"no removable node {node_id[:8]}")
    if not workers:
        raise RuntimeError("the cluster has no node besides the head")
    return workers[-1]


def corrupt_shard(uri: str, step: int) -> str:
    """Flip 16 bytes in the middle of the largest .distcp shard of `step` (its size is kept, so
    only the checksum can tell)."""
    fs, root = resolve(uri)
    d = join(root, CHECKPOINTS_DIR, step_dirname(step))
    shards = sorted((f for f in fs.ls(d, detail=True) if f["name"].endswith(".distcp")), key=lambda f: -f["size"])
    if not shards:
        raise RuntimeError(f"no shard under {d}")
    path, size = shards[0]["name"], int(shards[0]["size"])
    data = bytearray(fs.cat_file(path))
    mid = size // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    fs.pipe_file(path, bytes(data))
    return f"corrupted {path.rsplit('/', 1)[-1]} of step {step}"
