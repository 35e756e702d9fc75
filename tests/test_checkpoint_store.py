"""Conformance suite: one process (world size 1), run on memory://, file:// and s3:// (moto).

Covers: round trip, atomic commit (no manifest = partial, never loaded), list/latest, retention,
verify naming a corrupt shard, fallback to the previous step, clean_partial, mismatch errors,
re-saving a committed step, load_full.
"""

from __future__ import annotations

import logging
import pickle
import uuid

import pytest
import torch

from elastic._internal import storage
from elastic._internal.checkpoint import Checkpointer, CheckpointStore
from elastic._internal.checkpoint.layout import MANIFEST
from elastic.errors import CheckpointCorruptError, CheckpointMismatchError, NoCheckpointError

try:
    from storage_fixtures import assert_state_equal, ckpt_uri, make_state, moto_s3  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.storage_fixtures import (  # noqa: F401
        assert_state_equal, ckpt_uri, make_state, moto_s3,
    )

pytestmark = pytest.mark.timeout(60)


def save(ck: Checkpointer, state: dict, step: int) -> None:
    ck.save(state, step=step, rank=0, world_size=1, pg=None, store=None)
    if ck.async_save:
        assert ck.wait(timeout_s=30) is not None, ck.last_error


def shard_files(cs: CheckpointStore, step: int) -> list[str]:
    return sorted(
        p for p in cs.fs.ls(cs.step_path(step), detail=False) if p.endswith(".distcp")
    )


def corrupt(cs: CheckpointStore, path: str) -> None:
    data = bytearray(cs.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    cs.fs.pipe_file(path, bytes(data))


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip(ckpt_uri: str, async_save: bool) -> None:
    state = make_state(seed=1, steps=2)
    ck = Checkpointer(ckpt_uri, async_save=async_save)
    save(ck, state, 2)
    fresh = make_state(seed=7, steps=1)
    fresh["step"], fresh["extra"] = 0, {"epoch": 0, "tag": ""}
    info = Checkpointer(ckpt_uri).load(fresh)
    assert info is not None and info.step == 2 and info.status == "committed"
    assert info.world_size == 1 and info.bytes > 0 and info.skipped == ()
    assert pickle.loads(pickle.dumps(info)) == info  # crosses Ray actor boundaries
    assert_state_equal(state, fresh)
    assert isinstance(fresh["optim"]["param_groups"][0]["betas"], tuple)


def test_empty_location(ckpt_uri: str) -> None:
    cs = CheckpointStore(ckpt_uri)
    assert cs.list() == [] and cs.latest() is None and cs.verify() == []
    assert Checkpointer(ckpt_uri).load(make_state()) is None
    with pytest.raises(NoCheckpointError):
        cs.load_full()


def test_partial_never_listed_as_committed_nor_loaded(ckpt_uri: str) -> None:
    state = make_state(seed=1)
    ck = Checkpointer(ckpt_uri, async_save=False)
    save(ck, state, 10)
    save(ck, make_state(seed=2), 20)
    cs = CheckpointStore(ckpt_uri)
    cs.fs.rm(storage.join(cs.step_path(20), MANIFEST))  # as if rank 0 died before the commit
    assert [(i.step, i.status) for i in cs.list()] == [(10, "committed"), (20, "partial")]
    assert cs.latest().step == 10
    fresh = make_state(seed=3)
    assert ck.load(fresh).step == 10
    assert_state_equal(state["model"], fresh["model"])
    assert cs.clean_partial() == [cs.step_uri(20)]
    assert [i.step for i in cs.list()] == [10]


def test_list_latest_and_retention(ckpt_uri: str) -> None:
    ck = Checkpointer(ckpt_uri, keep_last=2, async_save=False)
    committed = []
    for step in (5, 10, 15, 20):
        ck.save(make_state(seed=step), step=step, rank=0, world_size=1, pg=None, store=None,
                on_commit=committed.append)  # fmt: skip
    cs = CheckpointStore(ckpt_uri)
    assert [i.step for i in cs.list()] == [15, 20]
    assert cs.latest().step == 20
    assert [i.step for i in committed] == [5, 10, 15, 20]
    assert all(i.seconds is not None and i.seconds >= 0 for i in committed)


def test_verify_names_corrupt_shard_and_load_falls_back(
    ckpt_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    ck = Checkpointer(ckpt_uri, async_save=False)
    old = make_state(seed=1)
    save(ck, old, 10)
    save(ck, make_state(seed=2), 20)
    cs = CheckpointStore(ckpt_uri)
    bad = shard_files(cs, 20)[0]
    corrupt(cs, bad)
    problems = cs.verify(20)
    assert len(problems) == 1 and bad.rsplit("/", 1)[-1] in problems[0]
    assert "checksum" in problems[0]
    assert cs.verify(10) == [] and cs.verify() == problems
    assert [i.status for i in cs.list(verify=True)] == ["committed", "corrupt"]
    fresh = make_state(seed=3)
    with caplog.at_level(logging.WARNING):
        info = ck.load(fresh)
    assert info.step == 10 and info.skipped == (20,)
    assert "step 20" in caplog.text
    assert_state_equal(old["model"], fresh["model"])
    with pytest.raises(CheckpointCorruptError):
        ck.load(make_state(), step=20)


def test_missing_and_short_shard(ckpt_uri: str) -> None:
    ck = Checkpointer(ckpt_uri, async_save=False)
    save(ck, make_state(seed=1), 10)
    save(ck, make_state(seed=2), 20)
    cs = CheckpointStore(ckpt_uri)
    shard = shard_files(cs, 20)[0]
    cs.fs.pipe_file(shard, cs.fs.cat_file(shard)[:100])
    assert "bytes, manifest says" in cs.verify(20)[0]
    cs.fs.rm(shard)
    assert cs.verify(20)[0].endswith("missing")
    assert ck.load(make_state()).skipped == (20,)


def test_every_checkpoint_corrupt_raises(ckpt_uri: str) -> None:
    ck = Checkpointer(ckpt_uri, async_save=False)
    save(ck, make_state(seed=1), 10)
    cs = CheckpointStore(ckpt_uri)
    corrupt(cs, shard_files(cs, 10)[0])
    with pytest.raises(CheckpointCorruptError, match="every committed checkpoint"):
        ck.load(make_state())


def test_mismatch_names_key_and_shapes(ckpt_uri: str) -> None:
    ck = Checkpointer(ckpt_uri, async_save=False)
    save(ck, {"model": {"w": torch.zeros(3, 4)}, "step": 1}, 1)
    with pytest.raises(CheckpointMismatchError) as e:
        ck.load({"model": {"w": torch.zeros(4, 4)}, "step": 0})
    msg = str(e.value)
    assert "'model.w'" in msg and "[3, 4]" in msg and "[4, 4]" in msg
    assert "fresh checkpoint location" in msg and "\n" not in msg
    with pytest.raises(CheckpointMismatchError, match="model.v"):
        ck.load({"model": {"w": torch.zeros(3, 4), "v": torch.zeros(1)}, "step": 0})
    with pytest.raises(CheckpointMismatchError, match="float64"):
        ck.load({"model": {"w": torch.zeros(3, 4, dtype=torch.float64)}, "step": 0})
    target = {"model": {"w": torch.ones(3, 4)}, "step": 0, "lr": 0.1}
    with pytest.raises(CheckpointMismatchError, match="'lr'"):
        ck.load(target)
    assert torch.equal(target["model"]["w"], torch.ones(3, 4))  # untouched on mismatch


def test_resave_committed_step(ckpt_uri: str) -> None:
    ck = Checkpointer(ckpt_uri, async_save=False)
    save(ck, make_state(seed=1), 10)
    newer = make_state(seed=2)
    save(ck, newer, 10)  # after a fallback the run reaches step 10 again
    cs = CheckpointStore(ckpt_uri)
    assert [(i.step, i.status) for i in cs.list()] == [(10, "committed")]
    assert cs.verify(10) == []
    fresh = make_state(seed=3)
    ck.load(fresh)
    assert_state_equal(newer, fresh)


def test_load_full_is_one_nested_dict(ckpt_uri: str) -> None:
    state = make_state(seed=4)
    save(Checkpointer(ckpt_uri, async_save=False), state, 3)
    full = CheckpointStore(ckpt_uri).load_full()
    assert full["step"] == 1 and full["extra"] == {"epoch": 1, "tag": "x"}
    assert_state_equal(state["model"], full["model"])
    assert_state_equal(state["optim"]["state"], full["optim"]["state"])


def test_uri_forms(tmp_path) -> None:
    """A plain path and file:// name the same location."""
    state = make_state()
    save(Checkpointer(str(tmp_path / "r"), async_save=False), state, 1)
    assert CheckpointStore(f"file://{tmp_path}/r").latest().step == 1
    assert CheckpointStore(f"memory://nothing-{uuid.uuid4().hex}").list() == []


def test_shard_larger_than_the_write_behind_window_round_trips(tmp_path) -> None:
    """A shard of several write-behind windows (the disk write of each is started while the next is
    serialized): every byte is in the file, checksummed, and loads back equal."""
    from elastic._internal.checkpoint import dcp_write
    from elastic._internal.checkpoint.layout import CHECKSUM, checksum

    n = (2 * dcp_write._WRITE_BEHIND + 12345) // 4
    state = {"model": {"w": torch.randn(n, generator=torch.Generator().manual_seed(3)), "b": torch.ones(7)},
             "step": 5}
    uri = str(tmp_path / "ck")
    save(Checkpointer(uri, async_save=False), state, 5)
    cs = CheckpointStore(uri)
    assert cs.verify(5) == []
    (shard,) = shard_files(cs, 5)
    data = cs.fs.cat_file(shard)
    assert len(data) > 2 * dcp_write._WRITE_BEHIND
    entry = cs.read_manifest(5).files[shard.rsplit("/", 1)[-1]]
    assert (entry.size, entry.checksum) == (len(data), checksum(data, CHECKSUM))
    fresh = {"model": {"w": torch.zeros(n), "b": torch.zeros(7)}, "step": 0}
    assert Checkpointer(uri).load(fresh).step == 5
    assert torch.equal(fresh["model"]["w"], state["model"]["w"]) and fresh["step"] == 5
