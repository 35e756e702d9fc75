"""Typed faults that a rank inflicts on itself at a chosen step (deterministic, fire-once).

Each kind is one enum value with one implementation. A fault fires at most once per run: the
first rank to reach it creates a marker file with O_EXCL, so the step replayed after recovery does
not fire it again, and a test can count the markers to check that each fault fired exactly once.
"""

from __future__ import annotations

import ctypes
import enum
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from elastic.chaos import comm, procs


class FaultKind(str, enum.Enum):
    SIGKILL = "sigkill"  # the process dies at once (OOM kill, node loss)
    SEGFAULT = "segfault"  # a crash in native code
    SIGTERM = "sigterm"  # a preemption notice: leave gracefully
    HANG = "hang"  # stuck holding the GIL: answers nothing
    FREEZE = "freeze"  # SIGSTOP: the process stops, sockets stay open
    STALL = "stall"  # stuck in user code (GIL released): answers polls, makes no progress
    RAISE = "raise"  # user code raises
    BREAK_COMM = "break_comm"  # the rank's connections to its peers are cut (a network fault)


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    step: int
    rank: int
    inside: str | None = None
    """None: at the top of the step; "all_gather" / "reduce_scatter": inside the step's first FSDP2
    collective of that kind; "buddy_exchange": inside the commit's buddy exchange (elastic.chaos.inside)."""

    @property
    def marker(self) -> str:
        where = f"-in-{self.inside}" if self.inside else ""
        return f"fault-{self.kind.value}-step{self.step}-rank{self.rank}{where}"


def parse_faults(specs: Iterable[dict | Fault]) -> list[Fault]:
    out = []
    for s in specs:
        out.append(s if isinstance(s, Fault) else Fault(FaultKind(s["kind"]), int(s["step"]), int(s["rank"]),
                                                        s.get("inside")))
    return out


def fired(marker_dir: str | os.PathLike) -> list[str]:
    d = Path(marker_dir)
    return sorted(p.name for p in d.glob("fault-*")) if d.exists() else []


def maybe_inject(faults: Iterable[Fault], *, step: int, rank: int, marker_dir: str | os.PathLike) -> None:
    """Call at the top of each step: inflicts the fault planned for (step, rank), once."""
    for fault in faults:
        if fault.step != step or fault.rank != rank:
            continue
        if fault.inside is not None:
            from elastic.chaos import inside  # imports torch.distributed: only where asked for

            inside.arm(fault.inside, lambda f=fault: claim(marker_dir, f.marker) and inflict(f.kind))
        elif claim(marker_dir, fault.marker):
            inflict(fault.kind)


def claim(marker_dir: str | os.PathLike, name: str, detail: str = "") -> bool:
    """Create the marker `name`: True for the one caller that created it, in any process.

    The marker holds "PID TIME DETAIL": the chaos suite reads TIME to find what followed the fault.
    It appears with its record or not at all (written aside, then linked: link fails if the name
    exists): a process stopped between creating and writing it (a hang holding the GIL, a kill)
    must not leave an empty marker behind.
    """
    Path(marker_dir).mkdir(parents=True, exist_ok=True)
    tmp = os.path.join(marker_dir, f".{name}.{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(f"{os.getpid()} {time.time()} {detail}".strip().encode() + b"\n")
    try:
        os.link(tmp, os.path.join(marker_dir, name))
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def fired_at(marker_dir: str | os.PathLike) -> dict[str, float]:
    """Marker name -> the time its fault fired (every marker must hold exactly one record)."""
    out = {}
    for name in fired(marker_dir):
        lines = (Path(marker_dir) / name).read_text().splitlines()
        if len(lines) != 1:
            raise AssertionError(f"marker {name} holds {len(lines)} records: the fault fired more than once")
        out[name] = float(lines[0].split()[1])
    return out


def inflict(kind: FaultKind) -> None:
    if kind is FaultKind.SIGKILL:
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind is FaultKind.SEGFAULT:
        ctypes.string_at(0)
    elif kind is FaultKind.SIGTERM:
        os.kill(os.getpid(), signal.SIGTERM)
    elif kind is FaultKind.HANG:
        # PyDLL keeps the GIL across the call: no other thread of this process runs.
        ctypes.PyDLL(None).sleep(3600)
    elif kind is FaultKind.FREEZE:
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind is FaultKind.STALL:
        time.sleep(3600)
    elif kind is FaultKind.RAISE:
        raise RuntimeError("injected fault: user code raised")
    elif kind is FaultKind.BREAK_COMM:
        # The peers are the other worker actors; the process group's next collective fails on every
        # rank, while every process stays alive and healthy.
        peers = [p.pid for p in procs.actor_processes("WorkerActor", everywhere=True) if p.pid != os.getpid()]
        if not comm.break_connections(peers):
            raise RuntimeError("injected fault break_comm found no connection to a peer worker")
