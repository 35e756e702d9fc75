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


@pytest.mark.slow  # test_nodes kills the supervisor and resumes
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


def test_a_final_checkpoint_that_storage_refuses_fails_the_run_with_the_event(chaos_ray, rules_dir, tmp_path):
    """Honest exits: the state that should be durable at the end is not, so the run says so in one
    line, records checkpoint_failed, exits non-zero, and `elastic ls` shows the failed save."""
    from elastic._internal import storage_cmds
    from elastic.chaos.storage import StorageRule, arm

    job = harness.Job(root=tmp_path, workers=2, steps=21, every_n=10)  # step 21 is only saved at the end
    job.marker_dir.mkdir(parents=True, exist_ok=True)
    arm([StorageRule(name="final", op="write", path_contains=f"{job.run_dir}/checkpoints/step_00000021/",
                     marker_dir=str(job.marker_dir), kind="permanent")], rules_dir, tmp_path.name)
    out = harness.run(job)
    r = out.result
    assert r is not None and not r.ok and r.exit_code == 1, r
    assert "step 21 was not committed" in r.error and "\n" not in r.error.strip()
    failed = [e for e in out.events if e["event"] == "checkpoint_failed"]
    assert failed and failed[0]["step"] == 21 and out.events[-1]["event"] == "run_failed"
    assert harness.CheckpointStore(job.uri).latest_verified().step == 20
    import io

    text = io.StringIO()
    assert storage_cmds.cmd_ls(job.uri, out=text) == 0
    assert any(line.startswith("21 ") and "failed:" in line for line in text.getvalue().splitlines()), text.getvalue()
