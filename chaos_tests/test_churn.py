"""Churn: failures seconds apart, and failures during a recovery (issue 24, item 4).

Each run ends `torch.equal` to the failure-free run (harness.check), never restores from a checkpoint
while a survivor holds the newest state, and waits nowhere longer than the failure-detection bound
plus one cold start (harness.check_churn). The default run has the `churn` schedule; the kills at a
phase of a recovery (the group's rendezvous, the state transfer, the first step, a just-promoted
standby, an idle standby, a survivor lost while the rebuild waits) run with -m chaos_full.

The phase kills are deterministic: the rank that dies does it to itself at that phase
(elastic.chaos.phases: hooks in the worker's rendezvous and state transfer, installed by this
module's Ray setup hook; elastic.chaos.job: REBUILD and FIRST_STEP). With 2 ranks, rank 1 dies first;
at the same world size a survivor keeps its rank (roster.keep_places), so the survivor stays rank 0 and
the newcomer takes rank 1: the second victim is always the newcomer, so the survivor always holds the
newest state.
"""

from __future__ import annotations

import os

import pytest

from chaos_tests import harness
from chaos_tests.conftest import ray_runtime_env
from chaos_tests.harness import Action, Job, Trigger
from chaos_tests.schedules import Schedule, draw
from elastic.chaos import phases
from elastic.chaos.external import ExternalKind
from elastic.chaos.job import FIRST_STEP, REBUILD
from elastic._internal.supervisor.standby_pool import STANDBY_IDS

pytestmark = pytest.mark.timeout(150)

FIRST_KILL = 20
"""The step at which rank 1 dies in the phase tests (its survivor stays rank 0 in generation 1)."""


@pytest.fixture(scope="module")
def churn_ray(rules_dir, tmp_path_factory):
    """A Ray instance whose worker processes carry the phase hooks (elastic.chaos.phases)."""
    import ray

    from elastic.chaos import procs

    phase_dir = tmp_path_factory.mktemp("phase-rules")
    env = ray_runtime_env(str(rules_dir))
    env["env_vars"][phases.ENV] = str(phase_dir)
    env["worker_process_setup_hook"] = "elastic.chaos.hooks.phases"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=env)
    yield phase_dir
    ray.shutdown()
    left = procs.wait_gone(("WorkerActor", "SupervisorActor", "IDLE", "raylet", "gcs_server"), timeout_s=20)
    assert not left, f"left running after ray.shutdown(): {left}"


def _job(tmp_path, **kw) -> Job:
    kw.setdefault("steps", 80)
    kw.setdefault("step_sleep", 0.03)
    return Job(root=tmp_path, **kw)


def _run(tmp_path, job: Job, actions=(), *, markers: int) -> harness.Outcome:
    ref = harness.reference(tmp_path.parent, job)
    out = harness.run(job, list(actions))
    harness.check(out, ref, exact=True, expect_markers=markers)
    figures = harness.check_churn(out.events, bound_s=harness.churn_bound_s(job))
    print("churn:", figures)
    return out


def _member(events: list[dict], generation: int, rank: int) -> dict:
    built = [e for e in events if e["event"] == "group_built" and e["generation"] == generation]
    assert built, f"no generation {generation}"
    return next(m for m in built[0]["members"] if m["rank"] == rank)


# -- the default run ---------------------------------------------------------------------------
def test_churn_schedule_three_kills_seconds_apart(chaos_ray, rules_dir, tmp_path, chaos_seed):
    """Three SIGKILLs of random ranks seconds apart (schedules.Schedule.CHURN) at 2 ranks."""
    plan = draw("sigkill", Schedule.CHURN, chaos_seed(11), 2)
    print("plan:", plan.describe())
    job = plan.job(tmp_path)
    out = _run(tmp_path, job, plan.actions, markers=plan.n_faults)
    assert len([e for e in out.events if e["event"] == "recovered"]) >= 3


# -- kills at a phase of a recovery (-m chaos_full) ----------------------------------------------
@pytest.mark.chaos_full
@pytest.mark.parametrize("phase", ["arrive", "rendezvous"])
def test_kill_during_the_group_build(churn_ray, tmp_path, phase):
    """The newcomer of generation 1 dies before it checks in on the rendezvous store (`arrive`: the
    survivor waits in groups.arrive and must leave it when paused), or right after every rank did
    (`rendezvous`: the survivor is inside gloo's address exchange, bounded by the detection bound)."""
    job = _job(tmp_path, faults=[{"kind": "sigkill", "step": FIRST_KILL, "rank": 1}])
    phases.arm([phases.PhaseFault(phase, 1, 1, str(job.marker_dir))], churn_ray, tmp_path.name)
    try:
        out = _run(tmp_path, job, markers=2)
    finally:
        os.remove(churn_ray / f"{tmp_path.name}.json")
    events = out.events
    failed = [e for e in events if e["event"] == "group_failed" and e["generation"] == 1]
    assert failed, "generation 1 (whose newcomer died in its rendezvous) did not fail"
    assert not [e for e in events if e["event"] == "restored" and e["generation"] == 1], \
        "a rank of generation 1 restored although its group was never built"


@pytest.mark.chaos_full
def test_kill_during_the_state_transfer(churn_ray, tmp_path):
    """The newcomer of generation 1 dies as the survivor sends it the newest state."""
    job = _job(tmp_path, faults=[{"kind": "sigkill", "step": FIRST_KILL, "rank": 1}])
    phases.arm([phases.PhaseFault("transfer", 1, 1, str(job.marker_dir))], churn_ray, tmp_path.name)
    try:
        out = _run(tmp_path, job, markers=2)
    finally:
        os.remove(churn_ray / f"{tmp_path.name}.json")
    # The transfer happened (a peer restore) in a later generation, from the survivor.
    peer = [e for e in out.events if e["event"] == "restored" and str(e["source"]).startswith("peer")]
    assert peer, "no rank restored from a peer"


@pytest.mark.chaos_full
def test_kill_at_the_first_step_after_a_recovery(churn_ray, tmp_path):
    """The newcomer of generation 1 dies at the first step its group takes."""
    job = _job(tmp_path, faults=[{"kind": "sigkill", "step": FIRST_KILL, "rank": 1},
                                 {"kind": "sigkill", "step": FIRST_STEP, "rank": 1}])
    out = _run(tmp_path, job, markers=2)
    gens = {e["generation"] for e in out.events if e["event"] == "group_built"}
    assert max(gens) >= 2, gens


STANDBY_STEPS = 400
"""Steps of the standby tests (≈ 15 s at step_sleep 0.03): a standby's start-up (request to ready)
takes ≈ 3.3 s after the first step on 2 busy cores, a refill as long again, and the run must
outlive both with steps to spare for the recovery that follows. The kills wait for a standby to be
ready (Trigger("standby")), never for a step."""


@pytest.mark.chaos_full
def test_kill_of_a_just_promoted_standby(churn_ray, tmp_path):
    """Rank 1 is killed once a standby is ready; the standby promoted in its place (rank 1 again:
    the survivor keeps rank 0) dies as its group restores (before its first step)."""
    job = _job(tmp_path, steps=STANDBY_STEPS, faults=[{"kind": "sigkill", "step": REBUILD, "rank": 1}])
    out = _run(tmp_path, job, [Action(ExternalKind.KILL, Trigger("standby", None), rank=1)], markers=2)
    newcomer = _member(out.events, 1, 1)
    assert newcomer["worker"] >= STANDBY_IDS, f"generation 1's newcomer was not a promoted standby: {newcomer}"


@pytest.mark.chaos_full
def test_kill_of_an_idle_standby_then_of_a_rank(churn_ray, tmp_path):
    """An idle standby is killed while the group trains; it is replaced, and a later kill of a rank
    is recovered by the new standby."""
    job = _job(tmp_path, steps=STANDBY_STEPS)
    actions = [Action(ExternalKind.KILL, Trigger("standby", None), standby=True),
               # Waits until a standby is ready again: the killed one no longer counts (Chaos skips
               # the processes it has hit), so only its replacement satisfies it.
               Action(ExternalKind.KILL, Trigger("standby", None), rank=1)]
    out = _run(tmp_path, job, actions, markers=2)
    killed = out.chaos.log[0]["pid"]
    events = out.events
    members = [m for e in events if e["event"] == "group_built" for m in e["members"]]
    assert killed not in {m["pid"] for m in members}, "the killed standby joined a group"
    newcomer = _member(events, 1, 1)
    assert newcomer["worker"] >= STANDBY_IDS and newcomer["pid"] != killed, newcomer
    assert not [e for e in events if e["event"] == "worker_failed" and e["pid"] == killed], \
        "an idle standby's death counted as a worker failure"


@pytest.mark.chaos_full
def test_survivor_lost_while_the_rebuild_waits(churn_ray, tmp_path):
    """3 ranks, no standby: rank 0 dies; while the rebuild waits for a cold replacement, the
    survivor that was rank 1 is killed too. It is dropped there (a failure of its own) and the group
    is built from the last survivor, which holds the newest state, and two replacements."""
    job = _job(tmp_path, workers=3, standby_per_node=0,
               faults=[{"kind": "sigkill", "step": FIRST_KILL, "rank": 0}])
    out = _run(tmp_path, job, [Action(ExternalKind.KILL, Trigger("after", "worker_failed"), rank=1)], markers=2)
    reasons = [e["reason"] for e in out.events if e["event"] == "worker_failed"]
    assert "lost while the next group was formed" in reasons, reasons
    assert len([e for e in out.events if e["event"] == "group_built"]) == 2, "a group was built with a lost member"
