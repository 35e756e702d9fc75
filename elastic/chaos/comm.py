"""Break a process's collective communicator the way a network fault does: shut down its TCP
connections to its peers.

gloo offers no way to break a live communicator from the outside: `destroy_process_group()` and
the backend's `abort()` both left it working (an allreduce issued after either still succeeded).
A real network fault closes the peer-to-peer sockets under the library instead, so that is what
this does. The sockets are found through /proc: this process's established TCP connections whose
other end is held by one of the peer processes. Connections to anything else (Ray's raylet and
GCS, the rendezvous store hosted by the supervisor) are left alone.
"""

from __future__ import annotations

import os
import socket
from typing import Iterable

ESTABLISHED = "01"


def _socket_fds(pid: int) -> dict[int, int]:
    """Socket inode -> fd, for the open sockets of `pid`."""
    out: dict[int, int] = {}
    d = f"/proc/{pid}/fd"
    try:
        names = os.listdir(d)
    except OSError:
        return out
    for fd in names:
        try:
            link = os.readlink(f"{d}/{fd}")
        except OSError:
            continue  # closed while we looked
        if link.startswith("socket:["):
            out[int(link[8:-1])] = int(fd)
    return out


def _tcp_table() -> list[tuple[str, str, str, int]]:
    """(local address, remote address, state, inode) of every TCP socket in this namespace."""
    rows = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{name}") as f:
                next(f)
                for line in f:
                    p = line.split()
                    rows.append((p[1], p[2], p[3], int(p[9])))
        except OSError:
            continue
    return rows


def peer_connections(peers: Iterable[int]) -> list[int]:
    """fds of this process's established TCP connections whose other end one of `peers` holds."""
    mine = _socket_fds(os.getpid())
    theirs: set[int] = set()
    for pid in peers:
        if pid != os.getpid():
            theirs |= set(_socket_fds(pid))
    rows = _tcp_table()
    inode_at = {(local, remote): inode for local, remote, _, inode in rows}
    return sorted(mine[inode] for local, remote, state, inode in rows
                  if inode in mine and state == ESTABLISHED and inode_at.get((remote, local)) in theirs)


def break_connections(peers: Iterable[int]) -> list[int]:
    """Shut down (both directions) this process's TCP connections to `peers`; the fds it hit.

    shutdown() acts on the connection, not on the descriptor, so it is done through a duplicate:
    the library keeps its fd, and its next read or write on it fails as after a network fault.
    """
    fds = peer_connections(peers)
    for fd in fds:
        s = socket.socket(fileno=os.dup(fd))
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone
        finally:
            s.close()
    return fds
