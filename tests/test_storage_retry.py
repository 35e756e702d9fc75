"""Retry policies (classification, bounds, typed final errors, redaction) and the faulty fs.

No test sleeps for real: `sleep` is injected everywhere.
"""

from __future__ import annotations

import errno
import os
import pickle

import fsspec
import pytest

from elastic._internal import retry
from elastic._internal.checkpoint.faulty_fs import ENV, Fault, FaultyFileSystem, faults_to_env
from elastic.errors import ConfigError, StorageUnavailableError, TransientStorageError
from elastic._internal.storage import normalize_uri, resolve

pytestmark = pytest.mark.timeout(30)
POLICY = retry.RetryPolicy(name="t", attempts=4, total_s=60, initial_s=0.5, max_backoff_s=2)


class _ClientError(Exception):
    """Shaped like botocore's ClientError (a response dict with Error.Code and the status)."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


@pytest.mark.parametrize("exc", [
    ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("slow"),
    OSError(errno.ETIMEDOUT, "t"), OSError(errno.EAGAIN, "again"), OSError(errno.EBUSY, "SlowDown"),
    _ClientError("SlowDown", 503), _ClientError("InternalError", 500), _ClientError("X", 429),
    type("EndpointConnectionError", (Exception,), {})("no endpoint"),
])  # fmt: skip
def test_transient(exc: BaseException) -> None:
    assert retry.is_transient(exc) and not retry.is_permanent(exc)


def _wrapped(exc: BaseException, cause: BaseException) -> BaseException:
    """As s3fs raises it: its own exception, the botocore error as __cause__."""
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("exc", [
    PermissionError("denied"), OSError(errno.EROFS, "ro"), OSError(errno.ENOSPC, "full"),
    _ClientError("AccessDenied", 403), _ClientError("InvalidAccessKeyId", 403),
    _wrapped(FileNotFoundError("The specified bucket does not exist"), _ClientError("NoSuchBucket", 404)),
    type("NoCredentialsError", (Exception,), {})("Unable to locate credentials"),
])  # fmt: skip
def test_permanent(exc: BaseException) -> None:
    assert retry.is_permanent(exc) and not retry.is_transient(exc)


@pytest.mark.parametrize("path", ["s3://my-bucket/run/checkpoints", "s3://bucket-of-checkpoints/x",
                                  "The specified bucket does not exist"])
def test_a_missing_path_is_not_a_missing_bucket_whatever_its_words(path: str) -> None:
    """Classified from the error code, never the message: bucket names often contain "bucket"."""
    assert not retry.is_permanent(FileNotFoundError(path)) and not retry.is_transient(FileNotFoundError(path))


def test_neither_for_missing_file_or_bug() -> None:
    for exc in (FileNotFoundError("no such file: x"), ValueError("bug"), KeyError("k")):
        assert not retry.is_transient(exc) and not retry.is_permanent(exc)


def test_cause_chain_is_classified() -> None:
    try:
        try:
            raise _ClientError("SlowDown", 503)
        except Exception as inner:
            raise OSError("wrapped") from inner
    except OSError as exc:
        assert retry.is_transient(exc)


def test_retries_then_succeeds_with_backoff() -> None:
    sleeps: list[float] = []
    calls = iter([ConnectionResetError("1"), TimeoutError("2"), "ok"])

    def fn() -> str:
        v = next(calls)
        if isinstance(v, BaseException):
            raise v
        return v

    assert retry.call(POLICY, fn, op="read", uri="memory://x", sleep=sleeps.append) == "ok"
    assert len(sleeps) == 2 and sleeps[1] >= sleeps[0] - 0.2 and all(s <= 2.2 for s in sleeps)


def test_exhausted_raises_transient_storage_error_naming_op_and_uri() -> None:
    n = 0

    def fn() -> None:
        nonlocal n
        n += 1
        raise ConnectionResetError("reset by peer")

    with pytest.raises(TransientStorageError) as e:
        retry.call(POLICY, fn, op="write shard", uri="s3://b/run", sleep=lambda s: None)
    assert n == 4
    assert "write shard s3://b/run" in str(e.value) and "4 attempts" in str(e.value)


def test_total_time_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """stop_after_delay: a fake clock that jumps past total_s stops retries early."""
    clock = [0.0]
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    policy = retry.RetryPolicy(name="t", attempts=100, total_s=10, initial_s=1, max_backoff_s=1)
    n = 0

    def fn() -> None:
        nonlocal n
        n += 1
        clock[0] += 4.0
        raise TimeoutError("slow")

    with pytest.raises(TransientStorageError):
        retry.call(policy, fn, op="list", uri="memory://x", sleep=lambda s: None)
    assert n == 3  # 4 s, 8 s, 12 s > 10 s: stop


def test_permanent_fails_at_once() -> None:
    n = 0

    def fn() -> None:
        nonlocal n
        n += 1
        raise PermissionError(errno.EACCES, "Access Denied")

    with pytest.raises(StorageUnavailableError, match="storage refused.*credentials") as e:
        retry.call(POLICY, fn, op="write", uri="s3://b/run", sleep=lambda s: None)
    assert n == 1 and e.value.exit_code == 2


def test_other_errors_pass_through() -> None:
    with pytest.raises(FileNotFoundError):
        retry.call(POLICY, lambda: (_ for _ in ()).throw(FileNotFoundError("x")), op="read",
                   uri="memory://x", sleep=lambda s: None)  # fmt: skip


def test_credentials_never_in_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)

    def fn() -> None:
        raise PermissionError(f"denied for key {secret} password=hunter2 X-Amz-Signature=abc123")

    with pytest.raises(StorageUnavailableError) as e:
        retry.call(POLICY, fn, op="write", uri="s3://AKIDUSER:topsecret@bucket/run",
                   sleep=lambda s: None)  # fmt: skip
    msg = str(e.value)
    for leaked in (secret, "hunter2", "abc123", "topsecret"):
        assert leaked not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert pickle.loads(pickle.dumps(e.value)).args == e.value.args


def test_resolve_validates_schemes() -> None:
    with pytest.raises(ConfigError, match="unknown storage scheme 'nope'"):
        resolve("nope://x")
    with pytest.raises(ConfigError, match="unknown storage scheme 'nope'"):
        resolve("faulty::nope://x")
    fs, path = resolve("faulty::memory://r1")
    assert isinstance(fs, FaultyFileSystem) and path == "/r1"
    assert normalize_uri("memory://x/") == "memory://x"


# -- faulty fs -----------------------------------------------------------------------------
def _pattern(seed: int) -> list[bool]:
    fs = FaultyFileSystem(fs=fsspec.filesystem("memory"),
                          faults=[Fault("cat", probability=0.5)], seed=seed)  # fmt: skip
    fs.pipe_file("/ff/a", b"x")
    out = []
    for _ in range(32):
        try:
            fs.cat_file("/ff/a")
            out.append(False)
        except ConnectionResetError:
            out.append(True)
    return out


def test_faulty_fs_is_deterministic_under_a_seed() -> None:
    assert _pattern(3) == _pattern(3)
    assert _pattern(3) != _pattern(4)
    assert 4 < sum(_pattern(3)) < 28


def test_faulty_fs_after_times_latency_and_kinds() -> None:
    slept: list[float] = []
    fs = FaultyFileSystem(
        fs=fsspec.filesystem("memory"),
        faults=[
            Fault("pipe", after=1, times=1),
            Fault("ls", kind="latency", latency_s=0.25),
            Fault("rm", kind="permanent", path_contains="keep"),
            Fault("write", times=1),
        ],
        sleep=slept.append,
    )  # fmt: skip
    fs.pipe_file("/ft/a", b"1")
    with pytest.raises(ConnectionResetError):
        fs.pipe_file("/ft/b", b"2")
    fs.pipe_file("/ft/b", b"2")
    assert fs.fired[0] == 1
    assert len(fs.ls("/ft")) == 2 and slept == [0.25]
    with pytest.raises(PermissionError):
        fs.rm("/ft/keep")
    fs.rm("/ft/a")
    with pytest.raises(ConnectionResetError), fs.open("/ft/c", "wb") as f:
        f.write(b"data")
    with fs.open("/ft/c", "wb") as f:
        f.write(b"data")
    assert fs.cat_file("/ft/c") == b"data"
    assert dict(fs.fired) == {0: 1, 1: 1, 2: 1, 3: 1}
    with pytest.raises(ValueError, match="unknown fault op"):
        Fault("explode")


def test_faulty_fs_from_uri_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(ENV, faults_to_env([Fault("cat", times=2)], seed=5))
    fs, path = resolve(f"faulty::file://{tmp_path}/r")
    assert fs.seed == 5 and fs.faults == [Fault("cat", times=2)]
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/x", b"1")
    assert os.path.exists(f"{tmp_path}/r/x")
    n = 0

    def read() -> bytes:
        nonlocal n
        n += 1
        return fs.cat_file(f"{path}/x")

    assert retry.call(POLICY, read, op="read", uri="faulty::file://x", sleep=lambda s: None) == b"1"
    assert n == 3 and fs.fired[0] == 2
