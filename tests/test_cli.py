"""The command line: bad input gets one clear line and exit 2; real runs and resumes via `elastic`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "tests" / "jobs.py"
pytestmark = pytest.mark.timeout(120)


def elastic_cli(*args: str, timeout: float = 100) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ELASTIC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "elastic.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def elastic_cli_here(*args: str) -> subprocess.CompletedProcess:
    """`elastic ARGS` in this process (what `python -m elastic.cli` runs, without a torch import
    per case), for input refused before anything starts; the other tests run the real command."""
    import contextlib
    import io

    from elastic.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(p: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr
    for n in needles:
        assert n in errors[0], errors[0]


@pytest.mark.parametrize("args,needles", [
    (["run", "nope/missing.py:train"], ["does not exist"]),
    (["run", f"{JOBS}:no_such_fn"], ["no function 'no_such_fn'"]),
    (["run", f"{JOBS}"], ["FILE.py:FUNCTION"]),
    (["run", f"{JOBS}:train", "--config", "steps"], ["key=value"]),
    (["run", f"{JOBS}:train", "--min-workers", "3", "--max-workers", "2"], ["min_workers (3) > max_workers (2)"]),
    (["run", f"{JOBS}:train", "--checkpoint-uri", "bogus://x/y"], ["unknown storage scheme 'bogus'"]),
])
def test_bad_input_is_one_line_and_exit_2(args, needles):
    assert_one_line_error(elastic_cli_here(*args), 2, *needles)


def test_unwritable_storage_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    p = elastic_cli("run", f"{JOBS}:train", "--checkpoint-uri", str(blocker / "run"), "--config", "steps=2")
    assert_one_line_error(p, 2, "cannot write to")


@pytest.mark.parametrize("cmd", ["resume", "ls"])
def test_no_run_at_location(tmp_path, cmd):
    p = elastic_cli(cmd, str(tmp_path / "empty"))
    assert_one_line_error(p, 2, "no run")


@pytest.mark.slow  # test_ray_jobs refuses an unplaceable run in one line
def test_unplaceable_min_workers_names_resources(tmp_path):
    p = elastic_cli("run", f"{JOBS}:train", "--min-workers", "64", "--placement-timeout", "3",
                    "--checkpoint-uri", str(tmp_path / "r"), "--config", "steps=2", "--quiet")
    assert_one_line_error(p, 2, "min_workers=64", "CPU")


@pytest.mark.slow  # test_ownership runs and resumes through the CLI
@pytest.mark.timeout(300)
def test_run_resume_and_a_checkpoint_from_another_model(tmp_path):
    uri = str(tmp_path / "run")
    p = elastic_cli("run", f"{JOBS}:train", "--min-workers", "2", "--checkpoint-uri", uri, "--every-n-steps", "5",
                    "--config", "steps=12", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    ls = elastic_cli("ls", uri)
    assert ls.returncode == 0 and "12" in ls.stdout and "committed" in ls.stdout
    # resume with the stored spec: already at its last step, so it finishes at once from storage
    p = elastic_cli("resume", uri, "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    events = elastic_cli("events", uri)
    assert events.returncode == 0 and events.stdout.count("run_started") == 2
    # the same location with a different model: refused, nothing overwritten
    before = elastic_cli("ls", uri).stdout
    p = elastic_cli("run", f"{JOBS}:train_other_model", "--min-workers", "2", "--checkpoint-uri", uri,
                    "--config", "steps=20", "--quiet")
    assert_one_line_error(p, 2, "different model", "model.0.weight")
    assert elastic_cli("ls", uri).stdout == before


def test_more_bad_input_is_one_line_each_and_credentials_are_never_printed(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000005").mkdir(parents=True)
    (run / "checkpoints" / "step_00000005" / "manifest.json").write_text('{"format": "elastic-checkpoint/1", "step": [}')
    (run / "run.json").write_text('{"entrypoint": 3}')
    cases = [  # args, exit code, words the one line must hold
        (["run", f"{JOBS}:train", "--collective-timeout", "1e14"], 2, ["collective_timeout_s", "at most"]),
        (["run", f"{JOBS}:train", "--cpus-per-worker", "inf"], 2, ["cpus_per_worker must be a finite number"]),
        (["run", f"{JOBS}:train", "--hang-timeout", "nan"], 2, ["hang_timeout_s"]),
        (["chaos", str(run), "--mtbf", "inf"], 2, ["mtbf must be a finite number"]),
        (["chaos", str(run), "--mtbf", "soon"], 2, ["not a duration"]),
        (["inspect", str(run), "--step", "-1"], 2, ["steps are >= 0"]),
        (["inspect", str(run)], 2, ["no committed checkpoint"]),  # a torn manifest commits nothing
        (["verify", str(run), "--step", "5"], 1, ["unreadable manifest"]),
        (["resume", str(run)], 2, ["run.json is not a run spec"]),
        (["run", f"{JOBS}:train", "--checkpoint-uri", "bogus://AKIDUSER:topsecret@host/run"], 2, ["bogus"]),
    ]
    for args, code, needles in cases:
        p = elastic_cli_here(*args)
        assert_one_line_error(p, code, *needles)
        assert "topsecret" not in p.stderr + p.stdout


def test_a_file_unreachable_storage_or_no_run_is_one_line_and_exit_2(tmp_path):
    """Issue 25 item 12: a file given as a run's location, storage that refuses the connection, and
    `elastic chaos` where no run is: one line each, exit 2, promptly (no traceback, no exit 1)."""
    import time

    afile = tmp_path / "notes.txt"
    afile.write_text("not a run")
    cases = [(["resume", str(afile)], ["is a file, not a run's location"])]
    cases += [([cmd, str(afile)], ["is a file"]) for cmd in ("ls", "verify", "events", "inspect")]
    ftp = "ftp://AKIDUSER:topsecret@127.0.0.1:1/run"
    cases += [(["run", f"{JOBS}:train", "--checkpoint-uri", ftp], ["cannot reach the storage", "host and port"]),
              (["resume", ftp], ["cannot reach the storage"]),
              (["chaos", str(afile)], ["is a file"])]
    for args, needles in cases:
        p = elastic_cli_here(*args)
        assert_one_line_error(p, 2, *needles)
        assert "topsecret" not in p.stderr + p.stdout
    t0 = time.monotonic()
    p = elastic_cli_here("chaos", str(tmp_path / "nothing"), "--duration", "20s", "--wait", "1s")
    assert_one_line_error(p, 2, "no run at", "--wait")
    assert time.monotonic() - t0 < 10, "chaos waited out its duration where there is no run"


def test_resume_runs_no_entry_file_that_run_json_alone_names(tmp_path, monkeypatch):
    """Issue 25 item 9: URI/run.json is written by whoever can write URI. `resume` runs the entry file
    it names only when a run of this user on this machine was started with that file (and content);
    otherwise one line asks for --entrypoint, and nothing is imported."""
    import hashlib
    import json

    from elastic._internal import trusted

    from elastic import cli
    from elastic.result import Result
    from elastic.trainer import ElasticTrainer

    monkeypatch.setenv("ELASTIC_HOME", str(tmp_path / "home"))
    marker = tmp_path / "imported"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef train(config):\n    pass\n")
    run = tmp_path / "run"
    run.mkdir()
    entry = f"{evil}:train"
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    (run / "run.json").write_text(json.dumps({"entrypoint": entry, "entrypoint_sha256": sha, "host": "elsewhere",
                                              "train_loop_config": {}, "scaling": {}, "checkpoint": {}, "failure": {}}))
    started = []  # entry points handed to a trainer (a stand-in: no Ray here)
    monkeypatch.setattr(cli, "_trainer", lambda fn, entry, *a, **k: started.append(entry) or type(
        "T", (), {"fit": lambda self, **kw: Result(ok=True, exit_code=0, error=None, metrics={}, steps=0,
                                                   seconds=0.0, failures=0, recoveries=[], checkpoint=None,
                                                   uri=str(run))})())
    p = elastic_cli_here("resume", str(run))
    assert_one_line_error(p, 2, str(evil), "--entrypoint", "--trust-entrypoint")
    assert not marker.exists(), "resume imported an entry file that only run.json named"

    p = elastic_cli_here("resume", str(run), "--trust-entrypoint")  # the user vouches for it
    assert p.returncode == 0 and started == [entry] and marker.exists(), p.stderr
    assert f"resume runs {entry}" in p.stderr
    # A run started here with the file records it: a plain resume then runs it without asking.
    marker.unlink()
    ElasticTrainer(lambda c: None, checkpoint=__import__("elastic").CheckpointConfig(uri=str(tmp_path / "other")),
                   entrypoint=entry)._write_spec()
    assert trusted.is_trusted(entry, sha)
    p = elastic_cli_here("resume", str(run))
    assert p.returncode == 0 and started == [entry, entry] and marker.exists(), p.stderr
    evil.write_text(evil.read_text() + "# changed\n")  # another content at the same path: not trusted
    assert not trusted.is_trusted(entry, hashlib.sha256(evil.read_bytes()).hexdigest())


class SlowToShrink:
    """A user's policy: elastic's decisions with a longer settle (a stand-in; only its name matters here)."""

    def __getattr__(self, name):
        from elastic.policy import DefaultPolicy

        return getattr(DefaultPolicy(settle_s=30.0), name)


def test_a_run_records_its_policy_and_resume_never_imports_a_users_policy_from_run_json(tmp_path, monkeypatch):
    """ElasticTrainer(policy=...) records the policy's class in run.json. `elastic resume` rebuilds
    elastic's DefaultPolicy (with its fields), but refuses, in one line naming the fix, to continue a
    run whose policy was the user's own, unless --default-policy says to go on without it."""
    import json

    from elastic import CheckpointConfig, cli
    from elastic.result import Result
    from elastic.policy import DefaultPolicy
    from elastic.trainer import ElasticTrainer

    monkeypatch.setenv("ELASTIC_HOME", str(tmp_path / "home"))
    entry_file = tmp_path / "train.py"
    entry_file.write_text("def train(config):\n    pass\n")
    entry, uri = f"{entry_file}:train", str(tmp_path / "run")
    given = []  # the policies handed to a trainer (a stand-in: no Ray here)
    monkeypatch.setattr(cli, "_trainer", lambda *a, policy=None, **k: given.append(policy) or type(
        "T", (), {"fit": lambda self, **kw: Result(ok=True, exit_code=0, error=None, metrics={}, steps=0,
                                                   seconds=0.0, failures=0, recoveries=[], checkpoint=None,
                                                   uri=uri)})())

    def spec(policy):
        trainer = ElasticTrainer(lambda c: None, checkpoint=CheckpointConfig(uri=uri), entrypoint=entry, policy=policy)
        assert trainer.run.policy is policy
        trainer._write_spec()
        return json.loads((tmp_path / "run" / "run.json").read_text())["policy"]

    assert spec(None)["class"] == "elastic.policy.DefaultPolicy"  # the public name, not where it lives
    assert spec(DefaultPolicy(standby_miss=0.05))["fields"]["standby_miss"] == 0.05
    p = elastic_cli_here("resume", uri)
    assert p.returncode == 0 and given[-1] == DefaultPolicy(standby_miss=0.05), p.stderr
    # a run recorded before elastic/_internal/ existed names DefaultPolicy by its old module
    run_json = tmp_path / "run" / "run.json"
    doc = json.loads(run_json.read_text())
    doc["policy"]["class"] = "elastic.supervisor.policy.DefaultPolicy"
    run_json.write_text(json.dumps(doc))
    p = elastic_cli_here("resume", uri)
    assert p.returncode == 0 and given[-1] == DefaultPolicy(standby_miss=0.05), p.stderr
    given.pop()

    assert spec(SlowToShrink()) == {"class": "test_cli.SlowToShrink"}
    p = elastic_cli_here("resume", uri)
    assert_one_line_error(p, 2, "test_cli.SlowToShrink", "ElasticTrainer(..., policy=SlowToShrink(...))",
                          "--default-policy")
    assert len(given) == 1, "a refused resume started a run"
    p = elastic_cli_here("resume", uri, "--default-policy")
    assert p.returncode == 0 and given[-1] is None, p.stderr
