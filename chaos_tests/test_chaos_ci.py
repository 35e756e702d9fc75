"""The CI subset of the chaos suite: in-process faults under every schedule, at fixed seeds.

Each test prints its seed; CHAOS_SEED=N (or --chaos-seed N) replays one with another seed.
"""

from __future__ import annotations

import pytest

from chaos_tests import harness
from chaos_tests.schedules import Schedule, draw

pytestmark = pytest.mark.timeout(120)

CASES = [  # kind, schedule, workers, seed
    # sigkill, sigterm and the spent budget have their own tests in tests/test_recovery.py: here
    # they run with -m slow, to keep the default run within CI's time.
    pytest.param("sigkill", Schedule.AT_STEP, 2, 1, marks=pytest.mark.slow),
    pytest.param("segfault", Schedule.CASCADE, 3, 2, marks=pytest.mark.slow),
    ("freeze", Schedule.RANDOM_TIME, 2, 3),
    ("hang", Schedule.DURING_CHECKPOINT, 2, 4),
    pytest.param("raise", Schedule.SEVERAL, 3, 5, marks=pytest.mark.slow),  # the loader test kills several
    pytest.param("stall", Schedule.DURING_REBUILD, 3, 6, marks=pytest.mark.chaos_full),  # ~27 s: full runs only
    pytest.param("sigterm", Schedule.AT_STEP, 3, 7, marks=pytest.mark.slow),
    pytest.param("break_comm", Schedule.AT_STEP, 3, 9, marks=pytest.mark.slow),  # the matrix runs it at 2-4
]


@pytest.mark.parametrize("kind,schedule,workers,seed", CASES, ids=lambda v: v.value if isinstance(v, Schedule) else None)
def test_chaos(chaos_ray, rules_dir, tmp_path, chaos_seed, kind, schedule, workers, seed):
    plan = draw(kind, schedule, chaos_seed(seed), workers)
    print("plan:", plan.describe())
    job = plan.job(tmp_path)
    plan.arm_storage(job, rules_dir)
    ref = harness.reference(tmp_path.parent, job)
    out = harness.run(job, plan.actions)
    harness.check(out, ref, exact=plan.exact, expect_markers=plan.n_faults)


@pytest.mark.slow
def test_failure_budget_spent_ends_with_error_and_checkpoint(chaos_ray, tmp_path, chaos_seed):
    plan = draw("sigkill", Schedule.CASCADE, chaos_seed(8), 2)
    job = plan.job(tmp_path, max_failures=1)
    out = harness.run(job, plan.actions)
    # The second failure spends the budget: the third fault never fires.
    harness.check(out, None, exact=True, expect_markers=2, expect_failed=True)
    assert "max_failures=1" in out.result.error


def test_dataloader_with_worker_processes_through_kills(chaos_ray, tmp_path, chaos_seed):
    """Batches read through ctx.data_loader (2 loader processes per rank, prefetching) are the
    sampler's: a run with two kills ends torch.equal to the reference that indexes tensors, and no
    loader process outlives its rank (check() waits for every worker-titled process to be gone)."""
    plan = draw("sigkill", Schedule.SEVERAL, chaos_seed(10), 2)
    print("plan:", plan.describe())
    job = plan.job(tmp_path, loader_workers=2)
    ref = harness.reference(tmp_path.parent, job)
    out = harness.run(job, plan.actions)
    harness.check(out, ref, exact=True, expect_markers=plan.n_faults)
