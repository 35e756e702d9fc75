"""Checkpoints under storage faults, busy saves, hostile files, and plain-torch readability."""

from __future__ import annotations

import os
import pickle
import uuid
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from elastic._internal.checkpoint import Checkpointer, CheckpointStore
from elastic._internal.checkpoint.faulty_fs import Fault, FaultyFileSystem
from elastic._internal.checkpoint.layout import DCP_METADATA, MANIFEST, Manifest, FileEntry, crc32
from elastic.errors import CheckpointCorruptError, StorageUnavailableError

try:
    from storage_fixtures import assert_state_equal, make_state
except ImportError:  # tests/ imported as a package
    from tests.storage_fixtures import assert_state_equal, make_state

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def mem_uri() -> Any:
    name = f"faults-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def faulty(*faults: Fault, **kw: Any) -> FaultyFileSystem:
    return FaultyFileSystem(fs=fsspec.filesystem("memory"), faults=list(faults), **kw)


def save1(ck: Checkpointer, state: dict, step: int) -> None:
    ck.save(state, step=step, rank=0, world_size=1, pg=None, store=None)


def test_transient_faults_are_retried(mem_uri: str) -> None:
    fs = faulty(Fault("write", times=1), Fault("pipe", path_contains=MANIFEST, times=1),
                Fault("cat", path_contains=".distcp", times=1))  # fmt: skip
    state = make_state(seed=1)
    save1(Checkpointer(mem_uri, async_save=False, fs=fs), state, 3)
    fresh = make_state(seed=2)
    assert Checkpointer(mem_uri, fs=fs).load(fresh).step == 3
    assert_state_equal(state, fresh)
    assert dict(fs.fired) == {0: 1, 1: 1, 2: 1}  # each fault fired exactly once


def test_permanent_fault_fails_fast_without_commit(mem_uri: str) -> None:
    fs = faulty(Fault("open_write", kind="permanent"))
    with pytest.raises(StorageUnavailableError, match="storage refused"):
        save1(Checkpointer(mem_uri, async_save=False, fs=fs), make_state(), 3)
    ck = Checkpointer(mem_uri, async_save=True, fs=fs)
    save1(ck, make_state(), 4)
    assert ck.wait(timeout_s=10) is None
    assert "StorageUnavailableError" in (ck.last_error or "")
    assert CheckpointStore(mem_uri).latest() is None
    assert fs.calls["open_write"] == 2  # one attempt each: no retries of a permanent error


@pytest.mark.parametrize("when_busy", ["skip", "wait"])
def test_one_save_in_flight(mem_uri: str, when_busy: str) -> None:
    fs = faulty(Fault("open_write", kind="latency", latency_s=0.5, path_contains=".distcp"))
    ck = Checkpointer(mem_uri, async_save=True, when_busy=when_busy, fs=fs)  # type: ignore[arg-type]
    save1(ck, make_state(seed=1), 1)
    save1(ck, make_state(seed=2), 2)  # the first is still writing
    info = ck.wait(timeout_s=10)
    steps = [i.step for i in CheckpointStore(mem_uri).list()]
    if when_busy == "skip":
        assert info.step == 1 and steps == [1]
    else:
        assert info.step == 2 and steps == [1, 2]


def test_async_stall_excludes_the_write(mem_uri: str) -> None:
    fs = faulty(Fault("open_write", kind="latency", latency_s=0.5, path_contains=".distcp"))
    ck = Checkpointer(mem_uri, async_save=True, fs=fs)
    save1(ck, make_state(), 1)
    assert ck.last_stall_s is not None and ck.last_stall_s < 0.4
    assert ck.wait(timeout_s=10).seconds >= 0.5


def test_malicious_metadata_is_never_unpickled(mem_uri: str, tmp_path: Any) -> None:
    """Even with a manifest rewritten to match, .metadata may only hold DCP classes."""
    ck = Checkpointer(mem_uri, async_save=False)
    save1(ck, make_state(), 1)
    cs = CheckpointStore(mem_uri)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps(Evil())
    cs.fs.pipe_file(f"{cs.step_path(1)}/{DCP_METADATA}", evil)
    m = cs.read_manifest(1)
    files = {**m.files, DCP_METADATA: FileEntry(len(evil), crc32(evil), 0)}
    forged = Manifest(m.step, m.world_size, m.time, m.seconds, m.save_id, files, m.values)
    cs.fs.pipe_file(f"{cs.step_path(1)}/{MANIFEST}", forged.to_json())
    with pytest.raises(CheckpointCorruptError, match="not allowed"):
        ck.load(make_state(), step=1)
    with pytest.raises(CheckpointCorruptError):
        cs.load_full()
    assert not marker.exists()


def test_committed_step_is_plain_dcp(tmp_path: Any) -> None:
    """A committed step dir loads with torch alone: dcp.load and dcp_to_torch_save."""
    state = make_state(seed=5)
    ck = Checkpointer(str(tmp_path / "run"), async_save=True)
    save1(ck, state, 9)
    info = ck.wait(timeout_s=10)
    step_dir = str(tmp_path / "run" / "checkpoints" / "step_00000009")
    assert info.uri == f"file://{step_dir}"
    target = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
    dcp.load(target, checkpoint_id=step_dir, no_dist=True)
    assert_state_equal(state["model"], target["model"])
    out = tmp_path / "full.pt"
    dcp_to_torch_save(step_dir, str(out))
    full = torch.load(out, weights_only=True)
    assert_state_equal(state["model"], full["model"])
    assert_state_equal(state["optim"]["state"], full["optim"]["state"])


def test_a_manifest_of_an_older_version_with_crc32_still_verifies_and_loads(tmp_path: Any) -> None:
    """Manifests name their checksum (xxh3-64 now); one that names none is CRC-32, as before."""
    uri = str(tmp_path / "run")
    state = make_state(seed=6)
    ck = Checkpointer(uri, async_save=False)
    save1(ck, state, 3)
    cs = CheckpointStore(uri)
    new = cs.read_manifest(3)
    assert new.checksum == "xxh3-64"
    step_dir = tmp_path / "run" / "checkpoints" / "step_00000003"
    legacy = {name: FileEntry(e.size, crc32((step_dir / name).read_bytes()), e.rank) for name, e in new.files.items()}
    old = Manifest(new.step, new.world_size, new.time, new.seconds, new.save_id, legacy, new.values)
    doc = old.to_json()
    assert b'"crc32"' in doc
    (step_dir / MANIFEST).write_bytes(doc.replace(b'"checksum": "crc32",\n', b""))  # as old versions wrote it
    assert cs.read_manifest(3).checksum == "crc32" and cs.verify(3) == []
    target = make_state(seed=99)
    assert ck.load(target, step=3).step == 3
    assert_state_equal(state["model"], target["model"])
