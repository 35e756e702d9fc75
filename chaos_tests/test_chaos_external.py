"""CI subset, external faults: storage error, corrupted shard, supervisor killed, driver killed."""

from __future__ import annotations

import pytest

from chaos_tests import harness
from chaos_tests.schedules import Schedule, draw

pytestmark = pytest.mark.timeout(120)


def _run(plan, tmp_path, rules_dir, **job_kw):
    print("plan:", plan.describe())
    job = plan.job(tmp_path, **job_kw)
    plan.arm_storage(job, rules_dir)
    return job, harness.reference(tmp_path.parent, job)


def test_storage_error_during_checkpoint_write(chaos_ray, rules_dir, tmp_path, chaos_seed):
    plan = draw("storage_error", Schedule.DURING_CHECKPOINT, chaos_seed(11), 2)
    job, ref = _run(plan, tmp_path, rules_dir)
    out = harness.run(job, plan.actions)
    harness.check(out, ref, exact=True, expect_markers=plan.n_faults)


@pytest.mark.chaos_full  # ~50 s (every worker restarts cold): full runs only
def test_corrupt_shard_then_all_workers_lost_falls_back(chaos_ray, rules_dir, tmp_path, chaos_seed):
    plan = draw("corrupt_shard", Schedule.AT_STEP, chaos_seed(12), 2)
    job, ref = _run(plan, tmp_path, rules_dir, step_sleep=0.05)
    out = harness.run(job, plan.actions)
    harness.check(out, ref, exact=True, expect_markers=plan.n_faults)
    restored = [e for e in out.events if e["event"] == "restored" and e["source"].startswith("checkpoint")]
    corrupted = out.chaos.log[0]["step"]
    assert restored and all(int(e["source"].split(":")[1]) < corrupted for e in restored), restored


def test_supervisor_killed_then_resume(chaos_ray, rules_dir, tmp_path, chaos_seed):
    plan = draw("kill_supervisor", Schedule.AT_STEP, chaos_seed(13), 2)
    job, ref = _run(plan, tmp_path, rules_dir)
    out = harness.run(job, plan.actions)
    assert out.raised is not None or (out.result is not None and not out.result.ok)
    assert not harness.procs.wait_gone(timeout_s=30), "workers outlived their supervisor"
    r = harness.resume(job)
    assert r.ok, r.error
    out.raised, out.result = None, r
    harness.check(out, ref, exact=True, expect_markers=plan.n_faults)


def test_driver_killed_then_elastic_resume(chaos_ray, rules_dir, tmp_path, chaos_seed):
    plan = draw("kill_driver", Schedule.AT_STEP, chaos_seed(14), 2)
    job, ref = _run(plan, tmp_path, rules_dir, storage_wrapper=False)
    address = chaos_ray.get_runtime_context().gcs_address
    out = harness.run_driver(job, plan.actions, address)
    assert out.exit_codes[0] == -9 and out.exit_codes[1] == 0, (out.exit_codes, out.raised)
    harness.check(out, ref, exact=True, expect_markers=plan.n_faults)
