"""The CLI's storage commands: output, exit codes, and the one-line errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from elastic._internal import storage_cmds as sc
from elastic._internal.checkpoint import Checkpointer, CheckpointStore

try:
    from storage_fixtures import assert_state_equal, make_state
except ImportError:  # tests/ imported as a package
    from tests.storage_fixtures import assert_state_equal, make_state

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def run_uri(tmp_path: Any) -> str:
    uri = f"file://{tmp_path}/run"
    ck = Checkpointer(uri, async_save=False)
    for step in (10, 20):
        ck.save(make_state(seed=step), step=step, rank=0, world_size=1, pg=None, store=None)
    return uri


def test_ls(run_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    cs = CheckpointStore(run_uri)
    cs.fs.makedirs(cs.step_path(30), exist_ok=True)  # an abandoned save
    assert sc.cmd_ls(run_uri) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STEP", "TIME", "WORLD", "BYTES", "SECONDS", "STATUS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["10", "20", "30"]
    assert lines[1].endswith("committed") and lines[3].endswith("partial")


def test_ls_verify_marks_corrupt(run_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    cs = CheckpointStore(run_uri)
    shard = next(p for p in cs.fs.ls(cs.step_path(20), detail=False) if p.endswith(".distcp"))
    cs.fs.pipe_file(shard, b"garbage")
    assert sc.cmd_ls(run_uri, verify=True) == 0
    assert capsys.readouterr().out.splitlines()[2].endswith("corrupt")
    assert sc.cmd_verify(run_uri) == 1
    cap = capsys.readouterr()
    assert shard.rsplit("/", 1)[-1] in cap.out and cap.err.startswith("error: ")
    assert sc.cmd_verify(run_uri, step=10) == 0


def test_inspect(run_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert sc.cmd_inspect(run_uri) == 0
    out = capsys.readouterr().out
    assert "step_00000020" in out and "model.0.weight" in out and "[16, 8]" in out
    assert "float32" in out and ".distcp" in out and "optim.param_groups" in out


def test_export_is_world_size_independent(run_uri: str, tmp_path: Any,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "export.pt"
    assert sc.cmd_export(run_uri, str(out), step=10) == 0
    assert "exported step 10" in capsys.readouterr().out
    full = torch.load(out, weights_only=True)
    expected = make_state(seed=10)
    assert_state_equal(expected["model"], full["model"])
    assert full["step"] == 1


def test_events(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ev").mkdir()
    lines = [
        {"event": "run_started", "time": 1700000000.5, "name": "demo run", "uri": "file:///x"},
        {"event": "worker_failed", "time": 1700000001.123, "rank": 1, "pid": 123, "loss": 0.25},
    ]
    (tmp_path / "ev" / "events.jsonl").write_text(
        "\n".join(json.dumps(x) for x in lines) + "\n{torn"
    )
    assert sc.cmd_events(str(tmp_path / "ev")) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  worker_failed  rank=1 pid=123 loss=0.25" in out[1]
    assert 'name="demo run"' in out[0] and out[2].startswith("?")
    assert sc.cmd_events(str(tmp_path / "ev"), as_json=True) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[1])["pid"] == 123


@pytest.mark.parametrize("cmd", ["ls", "inspect", "verify", "export", "events"])
def test_no_run_exits_2(cmd: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"file://{tmp_path}/nothing"
    args: tuple = (uri, str(tmp_path / "o.pt")) if cmd == "export" else (uri,)
    assert getattr(sc, f"cmd_{cmd}")(*args) == 2
    err = capsys.readouterr().err
    assert err == f"error: no run at {uri} (no checkpoints/ or events.jsonl): check the URI\n"


def test_unknown_scheme_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert sc.cmd_ls("nope://bucket/run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown storage scheme 'nope'") and err.count("\n") == 1


def test_missing_step_exits_2(run_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert sc.cmd_inspect(run_uri, step=15) == 2
    assert "no committed checkpoint" in capsys.readouterr().err
