"""The one error tree of elastic.

Every error a user can meet derives from ElasticError and carries a message that names the problem
and what to do. Each class's `exit_code` is the one table of exit codes: a run or a command that one
of them ends exits with it (1: training or storage let the run down; 2: bad usage or input). Errors cross Ray actor boundaries, so each keeps a single-string constructor (which
pickles without a custom __reduce__).
"""

from __future__ import annotations


def exception_chain(exc: BaseException, limit: int = 8) -> list[BaseException]:
    """The exception and what it was raised from or during (libraries wrap: s3fs puts the botocore
    error in __cause__), newest first, without cycles."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < limit:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


class ElasticError(Exception):
    """Base of every error elastic raises on purpose."""

    exit_code = 1


def exit_code_of(exc: BaseException) -> int:
    """The exit code of a run or command that `exc` ends: its class's (an instance may override it),
    1 for an error that is not elastic's."""
    return exc.exit_code if isinstance(exc, ElasticError) else 1


class ConfigError(ElasticError, ValueError):
    """Bad configuration or usage: fix the input and run again (exit 2)."""

    exit_code = 2


class PlacementError(ElasticError):
    """The cluster cannot place the minimum number of workers within the bounded wait."""

    exit_code = 2


class StorageError(ElasticError):
    """Storage failed in a way retries did not (or must not) fix."""


class TransientStorageError(StorageError):
    """A storage error worth retrying (connection reset, 5xx, throttling, timeout)."""


class StorageUnavailableError(StorageError):
    """Storage is unreachable or refuses us for good (no bucket, permission denied, bad credentials)."""

    exit_code = 2


class CheckpointError(ElasticError):
    """A checkpoint could not be written or read."""


class NoCheckpointError(CheckpointError):
    """There is no committed checkpoint (or no run at all) at the location."""

    exit_code = 2


class CheckpointCorruptError(CheckpointError):
    """A committed checkpoint has a missing or corrupted shard."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by a different model (names or shapes differ)."""

    exit_code = 2


class RunLockedError(ElasticError):
    """Another live run owns the location (its lease is held): stop it, or wait for its lease."""

    exit_code = 2


class LeaseLostError(ElasticError):
    """This run no longer owns its location: another run took it over. Nothing more is committed."""


class CheckpointFailedError(CheckpointError):
    """A checkpoint that had to be committed (the final one, a preemption's, a stop's) was not."""


class WorkerGroupError(ElasticError):
    """The process group around a worker broke (peer died, hung, or membership is changing).

    Raised inside workers to unwind the training function; the supervisor rebuilds the group.
    """


class TrainingFailedError(ElasticError):
    """The run ended without finishing: user code raised, or the failure budget is spent."""
