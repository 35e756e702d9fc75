"""Find processes without psutil: /proc scans for Ray actor processes (by their process title).

Ray titles an actor's process `ray::ClassName.method` while it runs a method (`ray::ClassName`
when idle). The chaos suite uses these helpers to find the supervisor's PID, and to check that no
worker or supervisor process outlives a run; `elastic chaos` uses `not_a_worker` before it signals
a PID read from a run's event log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from elastic._internal.waiting import wait_until


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


WORKER_TITLE = "ray::WorkerActor"
START_SLACK_S = 1.5
"""Tolerance on a process's start time: /proc/stat's boot time has whole seconds."""


def started_at(pid: int) -> float | None:
    """When the process started (Unix seconds), None when it does not exist (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return None
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def title(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def not_a_worker(pid: int, *, listed_at: float) -> str | None:
    """Why `pid` is not the worker an event log listed at `listed_at` (Unix seconds), or None when it
    is: a live process titled ray::WorkerActor that started before it was listed (a process that
    started later got the pid after that worker died)."""
    start = started_at(pid)
    if start is None:
        return "no such process"
    name = title(pid) or "?"
    if not name.startswith(WORKER_TITLE):
        return f"it is {name[:60]!r}, not a {WORKER_TITLE} process"
    if start > listed_at + START_SLACK_S:
        return (f"it started {start - listed_at:.0f}s after the run listed that pid: the pid was reused")
    return None
