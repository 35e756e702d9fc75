"""`elastic chaos URI`: inject faults into a live run, at random, for users testing their setup.

    elastic chaos URI --mtbf 20s --faults kill,sigterm,stop,node --max-faults N --duration 120s --seed S

Follows URI/events.jsonl: the newest `group_built` names the workers (rank, pid), `worker_failed`
and `worker_left` remove them, `run_finished` / `run_failed` (or the run releasing its lease) end
the session. A log is not proof of life: before each fault the run must hold its lease (refused,
exit 2, when its driver is gone or it stopped renewing), and a PID is signalled only while it is
still that worker's process (titled ray::WorkerActor, started before the group was built). Faults arrive with
exponential inter-arrival times (mean: mtbf) against a worker drawn at random, until max_faults
were injected, the duration passed, or the run ended. `node` SIGKILLs every live worker on the
drawn worker's Ray node at once (a lost host; on a one-node run that is every worker). Signals go
to PIDs on this machine: run it on the node that hosts the workers (a local run, or one node of a
cluster: only its workers are hit).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from elastic.chaos import procs
from elastic.chaos.external import SIGNALS, ExternalKind, Target, inflict
from elastic.config import require_duration
from elastic.errors import ConfigError, ElasticError
from elastic._internal.events import ENDED, EVENTS_FILE, live_members, read_events
from elastic._internal.lease import Lease, pid_alive, same_pid_space
from elastic._internal.retry import redact
from elastic._internal.storage_cmds import open_location

TOOL_KINDS = (*SIGNALS, ExternalKind.NODE_WORKERS)
WORKER_KINDS = tuple(k.value for k in TOOL_KINDS)  # kill, segv, sigterm, stop, node


@dataclass
class ChaosReport:
    actions: list[dict] = field(default_factory=list)
    """Each: time (s since start), kind, pids, ranks, generation."""
    ended_by: str = ""
    """max_faults, duration, run_finished, run_failed, run_stopped, run_released."""

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for a in self.actions:
            kinds[a["kind"]] = kinds.get(a["kind"], 0) + 1
        shown = ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())) or "none"
        return f"chaos: {len(self.actions)} fault(s) injected ({shown}); stopped: {self.ended_by}"


def parse_seconds(text: str | float) -> float:
    """'20s', '2m', '1h', '1.5' -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    t = text.strip().lower()
    mult = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        for suffix in ("ms", "s", "m", "h"):
            if t.endswith(suffix):
                return float(t[: -len(suffix)]) * mult[suffix]
        return float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration: write e.g. 20s, 2m or 1h") from None


def run_chaos(uri: str, mtbf_s: float, faults: list[str] | tuple[str, ...] = ("kill",), max_faults: int = 3,
              duration_s: float = 120.0, seed: int | None = None, *,
              out: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep, poll_s: float = 0.2, wait_s: float = 10.0) -> ChaosReport:
    """Inject up to `max_faults` faults into the live run at `uri` within `duration_s`; see module doc.
    ConfigError when no run appears at `uri` within `wait_s` (or it is not a run's location)."""
    kinds = _checked_kinds(faults, mtbf_s, duration_s, max_faults, wait_s)
    _wait_for_run(uri, wait_s, clock=clock, sleep=sleep, poll_s=poll_s)
    seed = seed if seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    report = ChaosReport()
    t0 = clock()
    out(f"chaos: {redact(uri)} mtbf={mtbf_s:g}s faults={','.join(k.value for k in kinds)} max={max_faults} "
        f"duration={duration_s:g}s seed={seed}")
    next_at = t0 + rng.expovariate(1.0 / mtbf_s)
    lease, skipped = Lease(uri), set()
    if not any(e["event"] in ENDED for e in _read(uri)) and (ended_why := _require_lease(lease, uri)) is not None:
        report.ended_by = ended_why
        out(report.summary())
        return report
    while True:
        now, events = clock(), _read(uri)
        report.ended_by = _ended_by(events, len(report.actions), max_faults, now - t0, duration_s)
        if report.ended_by:
            break
        if now < next_at:
            sleep(min(poll_s, next_at - now))
            continue
        generation, members = live_members(events)
        members = [m for m in members if m.get("pid") and _is_worker(m, _built_at(events), skipped, out)]
        if not members:  # between groups: try again shortly, keeping the schedule's randomness
            sleep(poll_s)
            continue
        if (ended_why := _require_lease(lease, uri)) is not None:
            report.ended_by = ended_why
            break
        action = _strike(rng, kinds, members, generation, lambda: clock() - t0)
        if action is None:  # its process was gone already
            sleep(poll_s)
            continue
        report.actions.append(action)
        out(f"chaos: t={action['time']:.2f}s {action['kind']} pid={','.join(map(str, action['pids']))} "
            f"rank={','.join(map(str, action['ranks']))} generation={generation}")
        next_at = clock() + rng.expovariate(1.0 / mtbf_s)
    out(report.summary())
    return report


def _checked_kinds(faults: list[str] | tuple[str, ...], mtbf_s: float, duration_s: float, max_faults: int,
                   wait_s: float) -> list[ExternalKind]:
    """The fault kinds named, once the session's settings are checked (ValueError saying what to use)."""
    try:
        kinds = [ExternalKind(f) for f in faults]
    except ValueError as exc:
        raise ValueError(f"{exc}: use {', '.join(WORKER_KINDS)}") from None
    for k in kinds:
        if k not in TOOL_KINDS:
            raise ValueError(f"fault {k.value!r} is not injectable by this tool: use {', '.join(WORKER_KINDS)}")
    require_duration("mtbf", mtbf_s)
    require_duration("duration", duration_s)
    if max_faults < 0:
        raise ValueError("max_faults must be >= 0")
    if wait_s < 0:
        raise ValueError("wait must be >= 0")
    return kinds


def _ended_by(events: list[dict], injected: int, max_faults: int, elapsed: float, duration_s: float) -> str:
    """Why the session ends now: the run ended (its last ending event), max_faults, duration; ""
    while it goes on."""
    ended = [e["event"] for e in events if e["event"] in ENDED]
    if ended:
        return ended[-1]
    if injected >= max_faults:
        return "max_faults"
    if elapsed >= duration_s:
        return "duration"
    return ""


def _strike(rng: random.Random, kinds: list[ExternalKind], members: list[dict], generation: int,
            elapsed: Callable[[], float]) -> dict | None:
    """Inflict a fault drawn at random on a member drawn at random (a `node` fault: on every member
    on its node); the action for the report, or None when the process was gone already."""
    victim = rng.choice(members)
    kind = rng.choice(kinds)
    hit = [victim]
    if kind is ExternalKind.NODE_WORKERS:
        hit = [m for m in members if m.get("node_id") == victim.get("node_id")] or hit
    try:
        inflict(kind, Target(pid=int(victim["pid"]), pids=tuple(int(m["pid"]) for m in hit)))
    except ProcessLookupError:
        return None
    return {"time": round(elapsed(), 3), "kind": kind.value, "pids": [int(m["pid"]) for m in hit],
            "ranks": [m["rank"] for m in hit], "generation": generation}


def _require_lease(lease: Lease, uri: str) -> str | None:
    """None while the run at `uri` holds its lease; "run_released" once it gave its location back
    (it ended); ConfigError when it does not hold it (its driver is gone, or it stopped renewing):
    its event log may look live, but its PIDs are no longer its workers' to signal."""
    cur = lease.current()
    if cur is not None and cur.released:
        return "run_released"
    if cur is None:
        why = "it holds no lease (nothing under URI/lease/)"
    elif same_pid_space(cur) and not pid_alive(cur.pid, cur.pid_start):
        why = f"its driver (pid {cur.pid} on {cur.host}) is gone"
    else:
        why = lease.check(cur.token, cur.owner) or ""
    if why:
        raise ConfigError(f"refusing to signal anything: the run at {redact(uri)} does not hold its lease ({redact(why)}), "
                          "so it is not live and the PIDs in its event log may belong to other processes")
    return None


def _built_at(events: list[dict]) -> float:
    built = [e for e in events if e.get("event") == "group_built"]
    return float(built[-1].get("time") or 0.0) if built else 0.0


def _is_worker(member: dict, listed_at: float, skipped: set[int], out: Callable[[str], None]) -> bool:
    """The member's PID is still that worker's process (title and start time), else say once why
    it is left alone."""
    pid = int(member["pid"])
    why = procs.not_a_worker(pid, listed_at=listed_at)
    if why is not None and why != "no such process" and pid not in skipped:
        skipped.add(pid)
        out(f"chaos: not signalling pid {pid} (rank {member.get('rank')}): {why}")
    return why is None


def _wait_for_run(uri: str, wait_s: float, *, clock: Callable[[], float], sleep: Callable[[float], None],
                  poll_s: float) -> None:
    """Return once `uri` holds a run (its event log or its lease); ConfigError after `wait_s`."""
    open_location(uri)
    t0 = clock()
    while not (_read(uri) or Lease(uri).current() is not None):
        if clock() - t0 >= wait_s:
            raise ConfigError(f"no run at {redact(uri)} (no {EVENTS_FILE}, no lease) after {wait_s:g}s: check "
                              "the URI, or start the run first (--wait sets how long to wait for it)")
        sleep(poll_s)


def _read(uri: str) -> list[dict]:
    try:
        return read_events(uri)
    except OSError:  # the log is not there yet, or storage hiccuped: read again at the next poll
        return []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elastic chaos", description="inject random faults into a live run")
    p.add_argument("uri", help="the run's checkpoint URI (where events.jsonl lives)")
    p.add_argument("--mtbf", default="20s", help="mean time between faults (e.g. 20s, 2m)")
    p.add_argument("--faults", default="kill", help=f"comma-separated, from: {','.join(WORKER_KINDS)}")
    p.add_argument("--max-faults", type=int, default=3)
    p.add_argument("--duration", default="120s", help="stop after this long (e.g. 120s, 10m)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--wait", default="10s", help="how long to wait for a run to appear at URI (e.g. 10s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: `elastic chaos ...` calls main(argv_rest). Exit 0 done, 2 bad usage or no run."""
    args = build_parser().parse_args(argv)
    try:
        run_chaos(args.uri, parse_seconds(args.mtbf), [f.strip() for f in args.faults.split(",") if f.strip()],
                  args.max_faults, parse_seconds(args.duration), args.seed, wait_s=parse_seconds(args.wait))
    except ElasticError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
