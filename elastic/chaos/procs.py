"""Find processes without psutil: /proc scans for Ray actor processes (by their process title).

Ray titles an actor's process `ray::ClassName.method` while it runs a method (`ray::ClassName`
when idle). The chaos suite uses these helpers to find the supervisor's PID, and to check that no
worker or supervisor process outlives a run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from elastic.waiting import wait_until


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    title: str


def processes() -> list[Proc]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError, ValueError):
            continue
        if state == "Z":  # a zombie is already dead; it only waits for its parent to reap it
            continue
        out.append(Proc(int(name), ppid, title))
    return out


def descendants(root: int | None = None) -> list[Proc]:
    """Every live process below `root` (default: this process)."""
    root = os.getpid() if root is None else root
    procs = processes()
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [root]
    while todo:
        for p in children.get(todo.pop(), []):
            out.append(p)
            todo.append(p.pid)
    return out


def actor_processes(class_name: str, *, root: int | None = None, everywhere: bool = False) -> list[Proc]:
    """Live processes titled `ray::{class_name}` (below `root`, or anywhere with everywhere=True)."""
    procs = processes() if everywhere else descendants(root)
    return [p for p in procs if p.title.startswith(f"ray::{class_name}")]


def wait_gone(class_names: tuple[str, ...] = ("WorkerActor", "SupervisorActor"), *, timeout_s: float = 15.0,
              root: int | None = None, pids: set[int] | None = None) -> list[Proc]:
    """Wait until no such process is left (below root, or among `pids`); the ones still there."""
    def still_there() -> list[Proc]:
        left = [p for name in class_names for p in actor_processes(name, root=root, everywhere=pids is not None)]
        return [p for p in left if pids is None or p.pid in pids]

    if wait_until(lambda: not still_there(), timeout_s=timeout_s, interval_s=0.1):
        return []
    return still_there()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
