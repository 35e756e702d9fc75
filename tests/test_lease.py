"""Unit: one owner per run location (elastic._internal.lease), on local disk and on the moto S3 server: the
atomic create (and the refusal of stores without one), expiry watched on our own clock, liveness
checks, and a renewer that loses the lease on a permanent error."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import types
import uuid
from dataclasses import asdict, replace

import fsspec
import pytest
from fsspec.implementations.dirfs import DirFileSystem

from elastic._internal import storage
from elastic._internal.checkpoint import Checkpointer, CheckpointStore
from elastic._internal.checkpoint.faulty_fs import Fault, FaultyFileSystem
from elastic.errors import CheckpointError, ConfigError, LeaseLostError, RunLockedError
from elastic._internal.lease import Lease, Renewer, this_process
from elastic._internal.waiting import wait_until
from storage_fixtures import make_state, moto_s3  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["file", "s3"])
def uri(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/run"
    request.getfixturevalue("moto_s3")
    return f"s3://elastic-test/lease-{tmp_path.name}"


class Clock:
    """A monotonic clock and a sleep that only advances it (`on_sleep` runs at each sleep)."""

    def __init__(self, t: float = 1_000.0):
        self.t, self.slept, self.on_sleep = t, 0.0, None

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        self.slept += s
        if self.on_sleep is not None:
            self.on_sleep()


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


def elsewhere(name: str):
    """An owner on another host (so its pid cannot be checked from here)."""
    return replace(this_process(name), host="elsewhere", boot_id="x", pid_ns="pid:[1]")


def test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced(uri):
    clock = Clock()
    old = Lease(uri, clock=clock).acquire(elsewhere("away"))
    new_lease = Lease(uri, clock=clock, sleep=clock.sleep)
    new = new_lease.acquire(this_process("new"))  # watches the record until it has not changed for the TTL
    assert new.token == old.token + 1 and clock.slept > old.ttl_s
    with pytest.raises(LeaseLostError, match="taken over by run new"):
        Lease(uri, clock=clock).renew(old)
    assert not Lease(uri, clock=clock).holds(old.token)


def test_a_dead_owner_on_this_host_is_taken_over_at_once(tmp_path):
    uri = f"file://{tmp_path}/run"
    code = ("import sys, os, signal; from elastic._internal.lease import Lease, this_process; "
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


# -- item 5: a store without an atomic create; two owners of one token ---------------------------

class RacyFS(DirFileSystem):
    """A store without an atomic create (like gs:// before a conditional put): `rival` is written
    right after our own create, as a second driver's check-then-write would."""

    rival: bytes | None = None

    def pipe_file(self, path, value, **kwargs):
        super().pipe_file(path, value)
        if self.rival is not None and "lease" in path:
            super().pipe_file(path, self.rival)


def racy(name: str) -> RacyFS:
    return RacyFS(path=f"/racy-{name}", fs=fsspec.filesystem("memory"))


def test_a_store_without_an_atomic_create_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv(storage.UNSAFE_ENV, raising=False)
    with pytest.raises(ConfigError) as exc:
        Lease("memory://racy", fs=racy(tmp_path.name)).acquire(this_process("first"))
    assert "\n" not in str(exc.value) and storage.UNSAFE_ENV in str(exc.value)
    monkeypatch.setenv(storage.UNSAFE_ENV, "1")  # the explicit opt-in
    assert Lease("memory://racy", fs=racy(tmp_path.name)).acquire(this_process("first")).token == 1


def test_a_create_that_raced_is_read_back_and_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(storage.UNSAFE_ENV, "1")
    fs = racy(tmp_path.name)
    fs.rival = json.dumps(asdict(replace(elsewhere("rival"), token=1))).encode()
    with pytest.raises(RunLockedError, match="taken at the same time by run rival"):
        Lease("memory://racy", fs=fs).acquire(this_process("loser"))


def test_two_owners_of_one_token_are_told_apart(monkeypatch, tmp_path):
    monkeypatch.setenv(storage.UNSAFE_ENV, "1")
    fs = racy(tmp_path.name)
    lease = Lease("memory://racy", fs=fs)
    a = lease.acquire(this_process("a"))
    b = replace(elsewhere("b"), token=a.token)
    lease._write(b)  # b's check-then-write landed after a's read-back
    assert lease.holds(b.token, b.owner) and not lease.holds(a.token, a.owner)
    with pytest.raises(LeaseLostError, match="taken over by run b"):
        lease.renew(a)


# -- item 7: expiry measured here, never from another host's clock; provably dead owners ----------

def test_a_live_owner_with_a_skewed_clock_is_neither_taken_over_nor_fenced(uri):
    clock = Clock()
    owner_lease = Lease(uri, clock=clock)
    owner = owner_lease.acquire(elsewhere("skewed"))
    skew = -3600.0  # the owner's wall clock is an hour behind ours
    owner = replace(owner, renewed=owner.renewed + skew)
    owner_lease._write(owner)

    def renew_skewed() -> None:
        nonlocal owner
        owner = owner_lease.renew(owner)
        owner_lease._write(replace(owner, renewed=owner.renewed + skew))

    clock.on_sleep = renew_skewed
    with pytest.raises(RunLockedError, match="in use by run skewed"):
        Lease(uri, clock=clock, sleep=clock.sleep).acquire(this_process("new"))
    assert clock.slept < owner.ttl_s  # refused at its first renewal, not after the TTL
    worker = Lease(uri, clock=clock)  # a worker's fence: holds while it sees the record renewed
    for _ in range(3):
        assert worker.holds(owner.token, owner.owner)
        clock.t += owner.ttl_s * 0.9
        renew_skewed()
    assert worker.holds(owner.token, owner.owner)
    clock.t += owner.ttl_s + 1  # no renewal seen for the TTL: expired, whatever its clock says
    assert "was not renewed for" in worker.check(owner.token)


def test_a_dead_pid_in_another_pid_namespace_is_not_taken_for_dead(uri):
    clock = Clock()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    other_ns = replace(this_process("container"), pid=int(dead), pid_ns="pid:[4026531999]")
    Lease(uri, clock=clock).acquire(other_ns)
    assert Lease(uri, clock=clock, sleep=clock.sleep).acquire(this_process("next")).token == 2
    assert clock.slept > other_ns.ttl_s  # its pid means nothing here: only the TTL frees it


def test_an_owner_whose_ray_node_is_dead_is_taken_over_at_once(uri, monkeypatch):
    clock = Clock()
    fake_ray = types.SimpleNamespace(
        is_initialized=lambda: True,
        get_runtime_context=lambda: types.SimpleNamespace(gcs_address="10.0.0.1:6379", get_node_id=lambda: "n0"),
        nodes=lambda: [{"NodeID": "n0", "Alive": True}, {"NodeID": "n1", "Alive": False}])
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    Lease(uri, clock=clock).acquire(replace(elsewhere("gone"), ray_node="n1", ray_gcs="10.0.0.1:6379"))
    assert Lease(uri, clock=clock, sleep=clock.sleep).acquire(this_process("next")).token == 2
    assert clock.slept == 0  # no wait for the TTL


# -- item 14: a renewal storage refuses for good loses the lease, and commits stop ---------------

def _renewing(faults, clock=None):
    uri = f"memory://renew-{uuid.uuid4().hex[:8]}"
    fs = FaultyFileSystem(fs=fsspec.filesystem("memory"), faults=faults)
    lease = Lease(uri, fs=fs, **({"clock": clock} if clock else {}))
    rec = lease.acquire(this_process("renewing"))
    why: list[str] = []
    return uri, lease, rec, why, Renewer(lease, rec, every_s=0.01, on_lost=why.append)


def test_a_permanent_renewal_error_stops_the_runs_commits_with_one_line():
    uri, lease, rec, why, renewer = _renewing([Fault("pipe", kind="permanent", path_contains="lease", after=1)])
    renewer.start()
    try:
        assert wait_until(renewer.lost.is_set, timeout_s=10, interval_s=0.01)
    finally:
        renewer.stop(release=False)
    assert len(why) == 1 and "storage refuses to renew" in why[0] and "\n" not in why[0]
    ck = Checkpointer(uri, async_save=False, lease=(lease, rec.token, rec.owner))
    with pytest.raises(CheckpointError, match="no longer owned by this run: .* storage refuses to renew") as exc:
        ck.save(make_state(), step=1, rank=0, world_size=1, pg=None, store=None)
    assert "\n" not in str(exc.value) and CheckpointStore(uri).latest() is None


def test_transient_renewal_errors_are_retried_until_the_ttl():
    clock = Clock()
    uri, lease, rec, why, renewer = _renewing([Fault("pipe", path_contains="lease", after=1)], clock)
    renewer.start()
    try:
        assert wait_until(lambda: renewer.lease.fs.fired.get(0, 0) >= 6, timeout_s=20, interval_s=0.01)
        assert not renewer.lost.is_set() and lease.holds(rec.token)
        clock.t += rec.ttl_s + 1
        assert wait_until(renewer.lost.is_set, timeout_s=10, interval_s=0.01)
    finally:
        renewer.stop(release=False)
    assert "could not be renewed for 60s" in why[0] and not lease.holds(rec.token)


# -- item 6: the commit fence holds even for an owner that stalled past its check -----------------

def _stalled(uri: str, name: str, keep_last: int = 3):
    """An owner that passed its lease check and then stalled: its checks keep saying "holds"."""
    lease = Lease(uri)
    rec = lease.acquire(this_process(name))
    stale = Lease(uri)
    stale.check = lambda *a, **k: None  # the check it made before the stall
    return rec, Checkpointer(uri, async_save=False, keep_last=keep_last, lease=(stale, rec.token, rec.owner))


def _successor(uri: str, old) -> Checkpointer:
    Lease(uri).release(old)  # (or its TTL ran out)
    lease = Lease(uri)
    rec = lease.acquire(this_process("successor"))
    return Checkpointer(uri, async_save=False, keep_last=0, lease=(lease, rec.token, rec.owner))


def save(ck: Checkpointer, step: int, seed: int = 0) -> None:
    ck.save(make_state(seed=seed), step=step, rank=0, world_size=1, pg=None, store=None)


def test_a_stalled_owner_never_uncommits_its_successors_manifest(uri):
    old, ck_old = _stalled(uri, "old")
    new = _successor(uri, old)
    save(new, 5, seed=2)
    with pytest.raises(CheckpointError, match="committed by a newer owner"):
        save(ck_old, 5, seed=1)
    cs = CheckpointStore(uri)
    assert cs.read_manifest(5).lease == new.lease[1] and cs.verify(5) == []


def test_a_stalled_owner_never_replaces_a_manifest_committed_after_its_check(uri):
    old, ck_old = _stalled(uri, "old")
    new = _successor(uri, old)
    calls = []

    def check(*a, **k):  # the successor commits the same step while the old owner stalls
        calls.append(1)
        if len(calls) == 3:  # its last check, right before the manifest
            save(new, 5, seed=2)

    ck_old.lease[0].check = check
    with pytest.raises(CheckpointError, match="committed meanwhile"):
        save(ck_old, 5, seed=1)
    cs = CheckpointStore(uri)
    assert cs.read_manifest(5).lease == new.lease[1] and cs.verify(5) == []


def test_retention_by_an_owner_that_lost_the_location_deletes_nothing_of_its_successor(uri):
    old, ck_old = _stalled(uri, "old", keep_last=1)
    new = _successor(uri, old)
    for step in (1, 2, 3):
        save(new, step)
    ck_old._retain(10)  # stalled past its check: the newer lease's manifests are still kept
    assert [i.step for i in CheckpointStore(uri).list() if i.status == "committed"] == [1, 2, 3]
    lost = Checkpointer(uri, keep_last=1, lease=(Lease(uri), old.token, old.owner))
    lost._retain(10)  # its real check refuses before any deletion
    assert [i.step for i in CheckpointStore(uri).list() if i.status == "committed"] == [1, 2, 3]
