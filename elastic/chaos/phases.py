"""Faults at a phase of a rebuild, inflicted by a rank on itself (deterministic, fire-once).

A training function sees a generation only once its group is built: a fault planned at a step
cannot land inside the group's rendezvous or inside the state transfer. These phases can:

- `arrive`: the rank dies before it checks in on the generation's rendezvous store (its peers wait
  in `groups.arrive` and must leave as soon as the supervisor gives the generation up);
- `rendezvous`: it dies right after every rank checked in (its peers are inside gloo's address
  exchange, which only its bound ends);
- `transfer`: it dies as the newest state is sent between ranks (`peer_sync.broadcast_state`: its
  peers are in the broadcast).

Rules are JSON files in the directory named by ELASTIC_CHAOS_PHASES, re-read at every phase (so a
test arms them per run without restarting Ray). Each fires at most once per run, through the same
O_EXCL marker as every other fault (`fault-phase-{phase}-gen{G}-rank{R}`). Worker processes learn
the hooks through Ray's `worker_process_setup_hook="elastic.chaos.hooks.phases"`, which also
registers the chaos filesystem, and installs them once the worker imports what they wrap (a setup
hook must not import torch: elastic.chaos.hooks).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from elastic.chaos.faults import FaultKind, claim, inflict

ENV = "ELASTIC_CHAOS_PHASES"
PHASES = ("arrive", "rendezvous", "transfer")


@dataclass(frozen=True)
class PhaseFault:
    phase: str
    """arrive, rendezvous or transfer (see the module docstring)."""
    generation: int
    """The generation in which it fires (the rank's generation, 1 = the first rebuild)."""
    rank: int
    """The rank (in that generation) that dies."""
    marker_dir: str
    kind: str = FaultKind.SIGKILL.value

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        FaultKind(self.kind)

    @property
    def marker(self) -> str:
        return f"fault-phase-{self.phase}-gen{self.generation}-rank{self.rank}"


def arm(faults: list[PhaseFault], rules_dir: str | os.PathLike, run_id: str) -> Path:
    """Write the phase faults of one run (worker processes read them at each phase)."""
    Path(rules_dir).mkdir(parents=True, exist_ok=True)
    path = Path(rules_dir) / f"{run_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(f) for f in faults]))
    tmp.rename(path)
    return path


def _load() -> list[PhaseFault]:
    d = os.environ.get(ENV)
    if not d or not os.path.isdir(d):
        return []
    out: list[PhaseFault] = []
    for p in sorted(Path(d).glob("*.json")):
        try:
            out += [PhaseFault(**f) for f in json.loads(p.read_text())]
        except (OSError, ValueError, TypeError):
            continue
    return out


def maybe_inject(phase: str, *, generation: int, rank: int) -> None:
    for f in _load():
        if (f.phase, f.generation, f.rank) == (phase, generation, rank) and claim(f.marker_dir, f.marker):
            inflict(FaultKind(f.kind))


def _generation_of(ns: str) -> int:
    return int(ns.rsplit("gen", 1)[1])


def install() -> None:
    """Wrap the worker's rendezvous and state transfer with the phase hooks (in this process)."""
    from elastic._internal.worker import groups
    from elastic._internal.worker.recovery import peer_sync

    if getattr(groups.arrive, "_chaos_phases", False):
        return
    arrive, broadcast_state = groups.arrive, peer_sync.broadcast_state

    def arrive_hooked(store: Any, ns: str, world_size: int, **kw: Any) -> None:
        # The runtime sets RANK (torch's view of this rank) before it connects.
        rank = int(os.environ.get("RANK", "-1"))
        maybe_inject("arrive", generation=_generation_of(ns), rank=rank)
        arrive(store, ns, world_size, **kw)
        maybe_inject("rendezvous", generation=_generation_of(ns), rank=rank)

    def broadcast_hooked(snapshot: Any, src: int, ctrl: Any, step: int) -> None:
        from elastic.context import get_context

        maybe_inject("transfer", generation=get_context().generation, rank=ctrl.rank)
        broadcast_state(snapshot, src, ctrl, step)

    arrive_hooked._chaos_phases = True  # type: ignore[attr-defined]
    groups.arrive = arrive_hooked  # type: ignore[assignment]
    peer_sync.broadcast_state = broadcast_hooked  # type: ignore[assignment]


def setup() -> None:
    """Ray's worker setup hook for phase faults (kept for callers: elastic.chaos.hooks.phases)."""
    from elastic.chaos import hooks

    hooks.phases()
