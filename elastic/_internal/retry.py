"""Named retry policies for storage, in one place.

Only transient errors (connection resets, timeouts, 5xx, throttling) are retried, with exponential
backoff and jitter, bounded both in attempts and in total time. Permanent errors (permission denied,
bad credentials, missing bucket, read-only or full disk) fail at once as StorageUnavailableError.
Anything else (a missing file, a corrupt checkpoint, a bug) passes through unchanged: it is not a
storage-availability question. `sleep` is injectable so that tests never really sleep.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity
from tenacity import (
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from elastic.errors import StorageUnavailableError, TransientStorageError, exception_chain

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EHOSTUNREACH,
    errno.EBUSY,  # s3fs maps SlowDown / ServiceUnavailable / 503 to EBUSY
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs maps InternalError / 500 to EREMOTEIO
}
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
_TRANSIENT_CODES = {
    "Throttling", "ThrottlingException", "SlowDown", "RequestTimeout", "RequestLimitExceeded",
    "TooManyRequestsException", "InternalError", "ServiceUnavailable", "503", "500", "429",
}  # fmt: skip
_PERMANENT_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
    "ExpiredToken", "InvalidToken", "AllAccessDisabled", "AccountProblem", "403",
}  # fmt: skip
_TRANSIENT_CLASS_NAMES = {
    # botocore / aiohttp connection-level failures, matched by name so neither is a hard dependency
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ClientConnectionError", "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError",
    "ClientPayloadError", "IncompleteRead", "ResponseStreamingError",
}  # fmt: skip
_PERMANENT_CLASS_NAMES = {"NoCredentialsError", "PartialCredentialsError", "NoRegionError"}


def _aws_code(exc: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) of a botocore ClientError, or (None, None)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = (response.get("Error") or {}).get("Code")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), status


def is_permanent(exc: BaseException) -> bool:
    """Storage refuses us for good: retrying cannot help, the user must fix something."""
    if isinstance(exc, StorageUnavailableError):
        return True
    for e in exception_chain(exc):
        if isinstance(e, PermissionError) or type(e).__name__ in _PERMANENT_CLASS_NAMES:
            return True
        code, status = _aws_code(e)
        if code in _PERMANENT_CODES or status == 403:
            return True
        if isinstance(e, OSError) and e.errno in _PERMANENT_ERRNOS:
            return True
    # s3fs turns NoSuchBucket into a FileNotFoundError whose __cause__ carries the code (above); a
    # FileNotFoundError of its own is a missing path, whatever words the path or message contain.
    return False


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the same call may well succeed in a moment."""
    if isinstance(exc, TransientStorageError):
        return True
    if is_permanent(exc):
        return False
    for e in exception_chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if type(e).__name__ in _TRANSIENT_CLASS_NAMES:
            return True
        code, status = _aws_code(e)
        if code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return True
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            if e.errno in _TRANSIENT_ERRNOS:
                return True
        status = getattr(e, "status", None)  # aiohttp.ClientResponseError
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
    return False


_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^\s\"'<>`]*)")
# key=value / key: value / 'key': 'value' (dict reprs) whose key names a secret: secret, secret_key,
# aws_secret_access_key, X-Amz-Signature, sig (an Azure SAS), password, token, a quoted 'key', ...
_SECRET_PAIR = re.compile(
    r"(?i)([\w.-]*(?:secret|token|password|passwd|credential|signature|key_id|access_key|account_key)[\w.-]*"
    r"|\bsig|\bsas|(?<=[\"'])key(?=[\"']))([\"']?\s*[=:]\s*[\"']?)[^\s,;&\"'})\]]+"
)


def redact_url(url: str) -> str:
    """One URL as it may be shown: user info (anything before the last '@' of the part before the
    query) and the whole query and fragment replaced by ***. Parsed by hand rather than with
    urllib: secrets are often pasted raw, and a '/' in an unencoded secret key (common in AWS
    keys) makes urlsplit take the user info for a path."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut] + "?***"
    at = rest.rfind("@", 0, cut if cut >= 0 else len(rest))
    if at >= 0:
        rest = "***@" + rest[at + 1:]
    return f"{scheme}://{rest}"


def redact(text: str) -> str:
    """The text as it may be printed or logged: every URL in it through `redact_url`, values of
    secret-named keys (key=value, key: value, dict reprs) and the AWS secrets of the environment
    replaced by ***."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return _SECRET_PAIR.sub(r"\1\2***", text)


class _RedactedRecord(logging.LogRecord):
    def getMessage(self) -> str:  # noqa: N802 - logging's name
        return redact(super().getMessage())


def _redact_elastic_log_records() -> None:
    """Every log record of an `elastic.*` logger is printed through `redact` (catalog, lease and
    checkpoint warnings name URIs), whichever handler prints it."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_elastic_redacts", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name == "elastic" or record.name.startswith("elastic."):
            record.__class__ = _RedactedRecord if type(record) is logging.LogRecord else record.__class__
        return record

    factory._elastic_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


_redact_elastic_log_records()


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How hard to retry one kind of storage operation."""

    name: str
    """Shown in logs and errors."""
    attempts: int = 5
    """Most tries in all (the first included)."""
    total_s: float = 60.0
    """No new try starts after this many seconds from the first."""
    initial_s: float = 0.2
    """First backoff; doubles each retry, plus up to `jitter_s` random seconds."""
    max_backoff_s: float = 5.0
    """Cap of one backoff."""
    jitter_s: float = 0.2
    """Random extra per backoff, so that ranks retrying together spread out."""

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.total_s <= 0:
            raise ValueError("RetryPolicy needs attempts >= 1 and total_s > 0")


STORAGE_WRITE = RetryPolicy(name="storage_write", attempts=5, total_s=120.0)
"""Writing a shard, metadata or manifest: worth a couple of minutes before giving up the save."""
STORAGE_READ = RetryPolicy(name="storage_read", attempts=5, total_s=60.0)
"""Reading a checkpoint file or manifest."""
STORAGE_LIST = RetryPolicy(name="storage_list", attempts=4, total_s=30.0, max_backoff_s=2.0)
"""Listing or deleting: cheap calls; the supervisor should not hang on them."""
LEASE = RetryPolicy(name="lease", attempts=3, total_s=5.0, initial_s=0.1, max_backoff_s=1.0)
"""Reading or writing the lease's tiny record: the renewer's own loop retries until the TTL."""


def call(
    policy: RetryPolicy,
    fn: Callable[[], T],
    *,
    op: str,
    uri: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """fn() under `policy`; StorageUnavailableError or TransientStorageError naming op and URI."""
    where = redact(uri)
    retrying = tenacity.Retrying(
        stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.total_s),
        wait=wait_exponential_jitter(
            multiplier=policy.initial_s, max=policy.max_backoff_s, jitter=policy.jitter_s
        ),
        retry=retry_if_exception(is_transient),
        sleep=sleep,
        reraise=False,
        before_sleep=lambda rs: log.warning(
            "%s: %s %s failed (attempt %d), retrying: %s",
            policy.name, op, where, rs.attempt_number,
            redact(str(rs.outcome.exception()) if rs.outcome else ""),
        ),
    )  # fmt: skip
    try:
        return retrying(fn)
    except tenacity.RetryError as exc:
        last = exc.last_attempt.exception()
        raise TransientStorageError(
            f"{op} {where}: gave up after {exc.last_attempt.attempt_number} attempts "
            f"({policy.name} policy): {redact(_describe(last))}; check that the storage is "
            "reachable, then resume from the last committed checkpoint"
        ) from None
    except Exception as exc:  # noqa: BLE001 - classify, then re-raise as is or as our own type
        if is_permanent(exc) and not isinstance(exc, StorageUnavailableError):
            raise StorageUnavailableError(
                f"{op} {where}: storage refused the request: {redact(_describe(exc))}; check the "
                "URI, that the bucket exists, and the credentials and permissions"
            ) from None
        raise


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    return f"{type(exc).__name__}: {exc}"
