"""This process's TCP sockets, found through /proc (Linux), and shutting them down under a library.

gloo offers no way to break a live communicator: `shutdown()`, `abort()` and
`destroy_process_group()` leave its connections open until the group is freed in C++, and a peer
blocked in a ring collective waits on them. Shutting a connection down (not closing the library's
descriptor: a duplicate is shut) makes the library's next or pending read or write on it fail, as a
network fault would. Where /proc is missing every function here finds nothing and does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable

ESTABLISHED = "01"


def socket_fds(pid: int | None = None) -> dict[int, int]:
    """Socket inode -> fd, for the open sockets of `pid` (this process by default)."""
    out: dict[int, int] = {}
    d = f"/proc/{os.getpid() if pid is None else pid}/fd"
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


def tcp_table() -> list[tuple[str, str, str, int]]:
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


def established(inodes: Iterable[int]) -> set[int]:
    """Those of `inodes` that are established TCP connections (not listeners, not UDP or Unix)."""
    wanted = set(inodes)
    return {inode for _, _, state, inode in tcp_table() if inode in wanted and state == ESTABLISHED}


def shut_down(fds: Iterable[int]) -> list[int]:
    """Shut down (both directions) the connections behind these descriptors of this process; the
    fds it hit. Through a duplicate: the library keeps its descriptor, and its reads and writes on
    it fail from now on."""
    hit = []
    for fd in fds:
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # closed meanwhile
        try:
            s.shutdown(socket.SHUT_RDWR)
            hit.append(fd)
        except OSError:
            pass  # already gone
        finally:
            s.close()
    return hit
