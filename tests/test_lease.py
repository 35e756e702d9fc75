"""Unit: one owner per run location (elastic.lease), on local disk and on the moto S3 server."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace

import pytest

from elastic.checkpoint import Checkpointer, CheckpointStore
from elastic.errors import LeaseLostError, RunLockedError
from elastic.lease import Lease, this_process
from storage_fixtures import make_state, moto_s3  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["file", "s3"])
def uri(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/run"
    request.getfixturevalue("moto_s3")
    return f"s3://elastic-test/lease-{tmp_path.name}"


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_live_owner_locks_the_location_and_release_frees_it(uri):
    first = Lease(uri).acquire(this_process("first"))
    assert first.token == 1
    with pytest.raises(RunLockedError, match="in use by run first"):
        Lease(uri).acquire(this_process("second"))
    Lease(uri).release(first)
    second = Lease(uri).acquire(this_process("second"))
    assert second.token == 2 and not Lease(uri).holds(first.token) and Lease(uri).holds(2)


def test_of_two_racing_runs_exactly_one_takes_the_location(uri):
    results: list = []
    barrier = threading.Barrier(4)

    def race(i: int) -> None:
        barrier.wait()
        try:
            results.append(Lease(uri).acquire(this_process(f"r{i}")).token)
        except RunLockedError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r for r in results if isinstance(r, int)) == [1], results


def test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced(uri):
    clock = Clock()
    # An owner on another host (so liveness cannot be checked): only its TTL frees the location.
    other = replace(this_process("away"), host="elsewhere", boot_id="x")
    old = Lease(uri, clock=clock).acquire(other)
    with pytest.raises(RunLockedError):
        Lease(uri, clock=clock).acquire(this_process("new"))
    clock.t += old.ttl_s + 1
    new = Lease(uri, clock=clock).acquire(this_process("new"))
    assert new.token == old.token + 1
    with pytest.raises(LeaseLostError, match="taken over by run new"):
        Lease(uri, clock=clock).renew(old)
    assert not Lease(uri, clock=clock).holds(old.token)


def test_a_dead_owner_on_this_host_is_taken_over_at_once(tmp_path):
    uri = f"file://{tmp_path}/run"
    code = ("import sys, os, signal; from elastic.lease import Lease, this_process; "
            f"Lease({uri!r}).acquire(this_process('killed')); os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code], timeout=30)
    assert Lease(uri).current().name == "killed"
    assert Lease(uri).acquire(this_process("next")).token == 2  # no wait for the TTL


def test_a_commit_needs_the_lease_and_records_its_token(tmp_path):
    uri = f"file://{tmp_path}/run"
    lease = Lease(uri)
    mine = lease.acquire(this_process("mine"))
    ck = Checkpointer(uri, async_save=False, lease=(lease, mine.token))
    ck.save(make_state(), step=1, rank=0, world_size=1, pg=None, store=None)
    assert CheckpointStore(uri).read_manifest(1).lease == mine.token
    lease.release(mine)
    Lease(uri).acquire(this_process("successor"))
    with pytest.raises(Exception, match="no longer owned by this run"):
        ck.save(make_state(), step=2, rank=0, world_size=1, pg=None, store=None)
    assert [i.step for i in CheckpointStore(uri).list() if i.status == "committed"] == [1]
