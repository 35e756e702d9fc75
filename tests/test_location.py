"""One RunLocation per run: normalized once, carried in RunConfig, pickled across actors, and one
CheckpointStore per worker process."""

from __future__ import annotations

import os
import pickle

import pytest

from elastic._internal.checkpoint import Checkpointer, CheckpointStore
from elastic.config import CheckpointConfig, RunConfig, default
from elastic.errors import ConfigError
from elastic._internal.storage import RunLocation


def test_local_path_becomes_file_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = RunLocation.of("runs/a/")
    assert loc.uri == f"file://{tmp_path}/runs/a"
    assert loc.root == f"{tmp_path}/runs/a"
    assert RunLocation.of(tmp_path / "runs" / "a") == loc  # a PathLike too
    assert RunLocation.of(f"file://{tmp_path}/runs/a/") == loc
    monkeypatch.setenv("HOME", str(tmp_path))
    assert RunLocation.of("~/runs/a").uri == loc.uri


def test_memory_and_a_location_as_is():
    loc = RunLocation.of("memory://loc-test/run/")
    assert (loc.uri, loc.root) == ("memory://loc-test/run", "/loc-test/run")
    assert "memory" in loc.fs.protocol
    assert RunLocation.of(loc) is loc
    assert loc.path("checkpoints", "x") == "/loc-test/run/checkpoints/x"


def test_s3_keeps_its_uri_and_redacts_secrets():
    pytest.importorskip("s3fs")
    uri = "s3://AKIAXXXX:se/cr+et@bucket/runs/one?session_token=tok"
    loc = RunLocation.of(uri + "/")
    assert loc.uri == uri  # credentials stay in the URI (fsspec needs them), trailing slash dropped
    for shown in (repr(loc), loc.shown):
        assert "se/cr+et" not in shown and "tok" not in shown and "AKIAXXXX" not in shown
    assert "bucket/runs/one" in loc.shown


def test_unknown_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown storage scheme 'nope'"):
        RunLocation.of("nope://x")
    with pytest.raises(ConfigError, match="unknown storage scheme 'nope'"):
        RunConfig(checkpoint=CheckpointConfig(uri="nope://x"))


def test_location_pickles_as_its_uri(tmp_path):
    from ray import cloudpickle

    loc = RunLocation.of(str(tmp_path / "run"))
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        back = loads(dumps(loc))
        assert back == loc and back.uri == loc.uri and back.root == loc.root
        assert type(back.fs) is type(loc.fs)


def test_run_config_carries_one_location(tmp_path):
    run = RunConfig(checkpoint=CheckpointConfig(uri=str(tmp_path) + "/"))
    assert run.location == RunLocation.of(str(tmp_path))
    assert run.checkpoint.uri == run.location.uri == f"file://{tmp_path}"
    given = RunConfig(location=RunLocation.of("memory://loc-test/given"))
    assert given.checkpoint.uri == "memory://loc-test/given"
    same = RunConfig(checkpoint=CheckpointConfig(uri="memory://loc-test/given/"), location=given.location)
    assert same.location == given.location
    with pytest.raises(ConfigError, match="name different places"):
        RunConfig(checkpoint=CheckpointConfig(uri="memory://loc-test/other"), location=given.location)
    assert RunConfig().location is None
    assert pickle.loads(pickle.dumps(given)) == given


def test_defaults_live_in_the_configs():
    from elastic.trainer import ElasticTrainer

    assert default(CheckpointConfig, "keep_last") == CheckpointConfig().keep_last
    assert default(RunConfig, "train_loop_config") == {}
    with pytest.raises(AttributeError):
        default(RunConfig, "nope")
    ck = Checkpointer("memory://loc-test/defaults")
    cfg = CheckpointConfig()
    assert (ck.keep_last, ck.async_save, ck.when_busy, ck.commit_timeout_s) == (
        cfg.keep_last, cfg.async_save, cfg.when_busy, cfg.commit_timeout_s)
    trainer = ElasticTrainer(lambda c: None, checkpoint=CheckpointConfig(uri="memory://loc-test/trainer"))
    run = RunConfig()
    assert (trainer.run.name, trainer.run.seed, trainer.run.stop_timeout_s, trainer.run.progress_interval_s) == (
        run.name, run.seed, run.stop_timeout_s, run.progress_interval_s)
    assert trainer.uri == trainer.run.location.uri == "memory://loc-test/trainer"
    with pytest.raises(ConfigError, match="keep_last"):
        Checkpointer("memory://loc-test/defaults", keep_last=-1)


def test_a_worker_builds_one_store(tmp_path, monkeypatch):
    from elastic._internal.worker.services import Services

    built: list[str] = []
    init = CheckpointStore.__init__

    def counting(self, *a, **kw):
        init(self, *a, **kw)
        built.append(self.uri)

    monkeypatch.setattr(CheckpointStore, "__init__", counting)
    run = RunConfig(checkpoint=CheckpointConfig(uri=str(tmp_path / "run")))
    services = Services(run)
    assert built == [f"file://{tmp_path}/run"]
    assert services.checkpointer.store is services.catalog
    assert services.catalog.location is run.location
    assert services.latest_durable_step() == -1


def test_a_worker_needs_a_location():
    from elastic._internal.worker.services import Services

    with pytest.raises(ConfigError, match="location"):
        Services(RunConfig())
    assert not os.environ.get("ELASTIC_TEST_NEVER_SET")
