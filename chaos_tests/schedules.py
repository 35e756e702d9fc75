"""Seeded fault schedules: (fault kind, schedule, seed, world size) -> a Plan.

The same arguments always give the same plan. Schedules: at a step, at a random time, during a
checkpoint write (the write slowed by a storage latency rule so that it is in flight), during a
group rebuild (a rank of the rebuilt group killed as it restores), several at once, cascading (one
fault after another as each recovery completes), churn (three faults seconds apart, on random ranks).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from chaos_tests.harness import Action, Job, Trigger
from elastic.chaos.external import ExternalKind
from elastic.chaos.faults import FaultKind
from elastic.chaos.job import FIRST_STEP, REBUILD
from elastic.chaos.storage import StorageRule


class Schedule(str, enum.Enum):
    AT_STEP = "at_step"
    RANDOM_TIME = "random_time"
    DURING_CHECKPOINT = "during_checkpoint"
    DURING_REBUILD = "during_rebuild"
    SEVERAL = "several"
    CASCADE = "cascade"
    CHURN = "churn"


IN_PROCESS = [k.value for k in FaultKind]
EXTERNAL = ["node", "storage_error", "storage_latency", "corrupt_shard", "kill_supervisor", "kill_driver"]
KINDS = IN_PROCESS + EXTERNAL
# A signal a rank can receive from outside too: at a random time it comes from outside.
AS_SIGNAL = {"sigkill": ExternalKind.KILL, "segfault": ExternalKind.SEGV, "sigterm": ExternalKind.SIGTERM,
             "freeze": ExternalKind.STOP}


CHURN_GAP = 50
"""Steps between two faults of the churn schedule."""


@dataclass
class Plan:
    kind: str
    schedule: Schedule
    seed: int
    workers: int
    faults: list[dict] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    trips: list[int] = field(default_factory=list)
    storage: list[dict] = field(default_factory=list)
    """Storage rules without marker_dir/path (filled in by `job()`)."""
    exact: bool = True
    min_workers: int | None = None
    corrupted: tuple[int, ...] = ()
    job_kw: dict = field(default_factory=dict)
    """Job settings the schedule needs (e.g. slower steps so that a timed fault lands mid-run)."""

    @property
    def n_faults(self) -> int:
        return len(self.faults) + len(self.actions) + len(self.storage)

    def describe(self) -> str:
        at = {REBUILD: "rebuild", FIRST_STEP: "first_step"}
        parts = [f"{f['kind']}@{at.get(f['step'], 'step' + str(f['step']))}/rank{f['rank']}" for f in self.faults]
        parts += [f"{a.kind.value}@{a.trigger.kind}:{a.trigger.value}" + (f"/rank{a.rank}" if a.rank is not None else "")
                  for a in self.actions]
        parts += [f"storage:{s['kind']}:{s['op']}:{s['path']}" for s in self.storage]
        return ", ".join(parts)

    def job(self, root, **kw) -> Job:
        job = Job(root=root, workers=self.workers, min_workers=self.min_workers, faults=list(self.faults),
                  trips=list(self.trips), **{**self.job_kw, **kw})
        return job

    def arm_storage(self, job: Job, rules_dir) -> None:
        from elastic.chaos.storage import arm

        rules = [StorageRule(name=f"{i}-{s['kind']}", op=s["op"], kind=s["kind"], latency_s=s.get("latency_s", 0.0),
                             path_contains=f"{job.run_dir}/{s['path']}", marker_dir=str(job.marker_dir))
                 for i, s in enumerate(self.storage)]
        arm(rules, rules_dir, job.root.name + "-" + str(abs(hash(str(job.root)))))


SUPPORTED = {
    **{k: set(Schedule) for k in IN_PROCESS},
    "node": {Schedule.AT_STEP, Schedule.RANDOM_TIME},
    "storage_error": {Schedule.AT_STEP, Schedule.DURING_CHECKPOINT},
    "storage_latency": {Schedule.AT_STEP, Schedule.DURING_CHECKPOINT},
    "corrupt_shard": {Schedule.AT_STEP},
    "kill_supervisor": {Schedule.AT_STEP, Schedule.RANDOM_TIME},
    "kill_driver": {Schedule.AT_STEP, Schedule.RANDOM_TIME},
}


def draw(kind: str, schedule: Schedule, seed: int, workers: int, *, steps: int = 40, every_n: int = 10) -> Plan:
    if schedule not in SUPPORTED[kind]:
        raise ValueError(f"{kind} does not support schedule {schedule.value}")
    rng = random.Random(f"{kind}/{schedule.value}/{seed}/{workers}")
    p = Plan(kind, schedule, seed, workers)
    step = rng.randrange(3, steps - 6)
    rank = rng.randrange(workers)
    ckpt_step = every_n * rng.randrange(1, max(2, steps // every_n))
    if kind in IN_PROCESS:
        _in_process(p, rng, schedule, step, rank, ckpt_step, steps)
        return p
    if kind == "node":
        # Resize: the cluster has exactly `workers` CPUs; losing a node continues smaller, the
        # node that joins later grows the group back.
        p.min_workers = workers - 1
        p.exact = False
        # No dropout (its masks change with the world size), and a run long enough for the
        # returning node's worker to start and join before the end: removing a node, adding one
        # and starting a worker on it took 10 s under load (200 steps of 50 ms were too few). Slower
        # steps, not more of them: the drift across resizes grows with the number of steps (400
        # steps gave 1.5e-4 relative, past the 1e-4 bound).
        p.job_kw = {"dropout": 0.0, "steps": 200, "step_sleep": 0.1}
        trig = Trigger("trip", step) if schedule is Schedule.AT_STEP else Trigger("time", rng.uniform(0.3, 1.5))
        if trig.kind == "trip":
            p.trips.append(step)
        p.actions = [Action(ExternalKind.NODE_REMOVE, trig, rank=rank),
                     Action(ExternalKind.NODE_ADD, Trigger("after", "recovered"))]
    elif kind in ("storage_error", "storage_latency"):
        s = ckpt_step if schedule is Schedule.DURING_CHECKPOINT else every_n * rng.randrange(1, steps // every_n + 1)
        rule = {"op": "write", "path": f"checkpoints/step_{s:08d}/"}
        rule.update({"kind": "permanent"} if kind == "storage_error" else {"kind": "latency", "latency_s": 1.0})
        p.storage.append(rule)
        if schedule is Schedule.DURING_CHECKPOINT and kind == "storage_latency":
            p.faults.append({"kind": "sigkill", "step": s, "rank": rank})  # a rank dies while the write is slow
    elif kind == "corrupt_shard":
        # Corrupt the newest checkpoint, then lose every worker: the restore must skip the bad step.
        # Slow steps: a run at full speed could commit its final step before the chaos thread acts
        # (it did, under load), and a corrupt final checkpoint is a different test.
        p.job_kw = {"step_sleep": 0.05}
        p.actions = [Action(ExternalKind.CORRUPT_SHARD, Trigger("commit", 2 * every_n))]
        p.actions += [Action(ExternalKind.KILL, Trigger("now", None), rank=r) for r in range(workers)]
    elif kind in ("kill_supervisor", "kill_driver"):
        ek = ExternalKind.KILL_SUPERVISOR if kind == "kill_supervisor" else ExternalKind.KILL_DRIVER
        s = max(step, every_n + 1)
        trig = Trigger("trip", s) if schedule is Schedule.AT_STEP else Trigger("commit", every_n)
        if trig.kind == "trip":
            p.trips.append(s)
        p.actions = [Action(ek, trig)]
    return p


def _in_process(p: Plan, rng: random.Random, schedule: Schedule, step: int, rank: int, ckpt_step: int,
                steps: int) -> None:
    kind, w = p.kind, p.workers
    if schedule is Schedule.AT_STEP:
        p.faults = [{"kind": kind, "step": step, "rank": rank}]
    elif schedule is Schedule.RANDOM_TIME:
        if kind in AS_SIGNAL:
            # Seconds after the group is built. Steps sleep 60 ms (40 steps >= 2.4 s) so that the fault
            # lands mid-run even on a fast machine and with a late chaos thread.
            p.job_kw = {"step_sleep": 0.06}
            p.actions = [Action(AS_SIGNAL[kind], Trigger("time", round(rng.uniform(0.3, 1.2), 3)), rank=rank)]
        else:
            p.faults = [{"kind": kind, "step": rng.randrange(2, steps - 3), "rank": rank}]
    elif schedule is Schedule.DURING_CHECKPOINT:
        # The first step after a checkpoint's commit vote: its shards are still being written.
        p.faults = [{"kind": kind, "step": ckpt_step, "rank": rank}]
        p.storage = [{"op": "write", "path": f"checkpoints/step_{ckpt_step:08d}/", "kind": "latency",
                      "latency_s": 0.5}]
    elif schedule is Schedule.DURING_REBUILD:
        # A rank of the rebuilt group dies as it restores: inside the new group's first collectives
        # (agreeing on the step, the state broadcast). In-process, so it lands there however fast the
        # rebuild was.
        p.faults = [{"kind": kind, "step": step, "rank": rank}, {"kind": "sigkill", "step": REBUILD, "rank": 0}]
    elif schedule is Schedule.SEVERAL:
        ranks = rng.sample(range(w), min(2, w))
        p.faults = [{"kind": kind, "step": step, "rank": r} for r in ranks]
    elif schedule is Schedule.CASCADE:
        p.faults = [{"kind": kind, "step": step + i, "rank": (rank + i) % w} for i in range(3)]
    elif schedule is Schedule.CHURN:
        # Three faults seconds apart (CHURN_GAP steps of >= 30 ms), each on a random rank: the next
        # one often finds a standby just promoted, or its successor still starting.
        first = rng.randrange(10, 30)
        p.job_kw = {"steps": first + 3 * CHURN_GAP, "step_sleep": 0.03}
        p.faults = [{"kind": kind, "step": first + i * CHURN_GAP, "rank": rng.randrange(w)} for i in range(3)]
