"""Whole runs on S3 (moto's server on loopback, reached through s3fs): buckets whose names contain
"bucket", a second driver refused while the first trains, and a resume."""

from __future__ import annotations

import threading

import pytest

import elastic
from elastic._internal import storage_cmds
from elastic._internal.checkpoint import CheckpointStore
from elastic.errors import RunLockedError
from elastic._internal.events import read_events
from elastic._internal.waiting import wait_until
import jobs
from storage_fixtures import moto_s3  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def s3_ray(moto_s3):  # noqa: F811
    """Ray started after the S3 endpoint is in the environment, so that workers inherit it."""
    import fsspec
    import ray

    fs = fsspec.filesystem("s3")
    for bucket in ("my-bucket", "bucket-of-checkpoints"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def fit(uri: str, steps: int, step_sleep: float = 0.0) -> elastic.Result:
    return elastic.ElasticTrainer(
        jobs.train, train_loop_config={"steps": steps, "step_sleep": step_sleep},
        scaling=elastic.ScalingConfig(min_workers=2),
        checkpoint=elastic.CheckpointConfig(uri=uri, every_n_steps=10)).fit(raise_on_failure=False, quiet=True)


def test_a_run_in_my_bucket_refuses_a_second_driver_and_resumes(s3_ray):
    uri = "s3://my-bucket/run"
    box: dict = {}
    first = threading.Thread(target=lambda: box.update(r=fit(uri, 40, step_sleep=0.05)), daemon=True)
    first.start()
    assert wait_until(lambda: any(e["event"] == "group_built" for e in read_events(uri)), timeout_s=60)
    with pytest.raises(RunLockedError, match="is in use by run elastic"):
        fit(uri, 40)  # refused at once (a conditional put on S3), touching nothing
    first.join(120)
    assert box["r"].ok, box["r"].error
    assert storage_cmds.cmd_verify(uri) == 0
    r = fit(uri, 50)  # resume: the lease was released, the run continues from step 40
    assert r.ok and r.steps == 50, r.error
    restored = [e for e in r.events if e["event"] == "restored"]
    assert restored and restored[0]["source"] == "checkpoint:40"
    assert [i.step for i in CheckpointStore(uri).list()][-1] == 50


@pytest.mark.slow  # the refused-second-driver test trains in a bucket too
def test_a_fresh_run_in_bucket_of_checkpoints(s3_ray):
    r = fit("s3://bucket-of-checkpoints/fresh", 10)
    assert r.ok, r.error
    assert CheckpointStore("s3://bucket-of-checkpoints/fresh").latest_verified().step == 10
