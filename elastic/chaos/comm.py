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
from collections.abc import Iterable

from elastic._internal.sockets import ESTABLISHED, shut_down, socket_fds, tcp_table


def peer_connections(peers: Iterable[int]) -> list[int]:
    """fds of this process's established TCP connections whose other end one of `peers` holds."""
    mine = socket_fds()
    theirs: set[int] = set()
    for pid in peers:
        if pid != os.getpid():
            theirs |= set(socket_fds(pid))
    rows = tcp_table()
    inode_at = {(local, remote): inode for local, remote, _, inode in rows}
    return sorted(mine[inode] for local, remote, state, inode in rows
                  if inode in mine and state == ESTABLISHED and inode_at.get((remote, local)) in theirs)


def break_connections(peers: Iterable[int]) -> list[int]:
    """Shut down (both directions) this process's TCP connections to `peers`; the fds it hit."""
    return shut_down(peer_connections(peers))
