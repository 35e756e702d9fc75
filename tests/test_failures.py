"""Unit: what an exception that ended a generation means (user error, bad input, broken group)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from elastic.errors import CheckpointMismatchError, ConfigError, WorkerGroupError
from elastic._internal.protocol import FailureKind
from elastic._internal.worker.failures import GROUP_FAILURE_TEXT, classify, matches_group_failure_text

pytestmark = pytest.mark.timeout(30)

# One message per pattern, as torch 2.13's gloo printed it (see the table's third column).
SEEN = {
    "third_party/gloo/gloo/": "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Read error",
    "Connection closed by peer": "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:14259. This is typically "
                                 "caused by a remote worker crashing.",
    "Connection reset by peer": "Connection reset by peer",
    "Application timeout caused pair closure": "Application timeout caused pair closure",
    "for recv operation to complete": "[.../unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation to "
                                      "complete",
    "for send operation to complete": "[.../unbound_buffer.cc:134] Timed out waiting 2000ms for send operation to "
                                      "complete",
    "connectFullMesh": "[.../context.cc:81] connectFullMesh failed: Connection refused",
}


@pytest.mark.parametrize("pattern,_where,version", GROUP_FAILURE_TEXT, ids=[p for p, _, _ in GROUP_FAILURE_TEXT])
def test_each_group_failure_pattern_has_a_seen_message_that_it_matches(pattern, _where, version):
    assert version == "2.13"
    message = SEEN[pattern]
    assert pattern in message and matches_group_failure_text(message)
    assert classify(RuntimeError(message), group_broken=False) is FailureKind.GROUP


@pytest.mark.parametrize("exc", [
    RuntimeError("Timed out loading my data"),  # the words of a user's own error are not a broken group
    RuntimeError("cannot open Socket.py"),
    ValueError("Connection closed by peer"),  # only gloo's RuntimeError carries these messages
    KeyError("gloo"),
])
def test_user_errors_are_not_mistaken_for_a_broken_group(exc):
    assert classify(exc, group_broken=False) is FailureKind.USER


def test_typed_errors_and_the_collective_clock_decide_before_any_text():
    assert classify(WorkerGroupError("peer left"), group_broken=False) is FailureKind.GROUP
    assert classify(dist.DistNetworkError("x"), group_broken=False) is FailureKind.GROUP
    assert classify(ValueError("anything"), group_broken=True) is FailureKind.GROUP  # a consequence
    assert classify(CheckpointMismatchError("other model"), group_broken=True) is FailureKind.FATAL
    assert classify(ConfigError("bad input"), group_broken=False) is FailureKind.FATAL
    try:
        try:
            raise RuntimeError(SEEN["Connection closed by peer"])
        except RuntimeError as inner:
            raise ValueError("while logging the loss") from inner
    except ValueError as outer:
        assert classify(outer, group_broken=False) is FailureKind.GROUP


def _user_code_calling_a_library() -> None:
    import json

    json.loads("{")  # raises inside the stdlib


def test_the_signature_of_a_user_error_names_the_innermost_frame_of_user_code_and_the_step():
    from elastic._internal.worker.failures import signature

    try:
        _user_code_calling_a_library()
    except Exception as exc:  # noqa: BLE001 - the error under test
        sig = signature(exc, step=7)
    line = _user_code_calling_a_library.__code__.co_firstlineno + 3
    assert sig.type == "JSONDecodeError" and sig.step == 7
    assert sig.where == f"{__file__}:{line}", sig.where  # this file, not json's
    try:
        {}[0]
    except KeyError as exc:
        assert signature(exc, step=1).describe() == f"KeyError: 0 at {__file__}:{exc.__traceback__.tb_lineno} (step 1)"


def test_one_exit_code_table_the_error_classes_and_a_fatal_worker_error_agree():
    from elastic.errors import (CheckpointCorruptError, CheckpointFailedError, LeaseLostError, NoCheckpointError,
                                StorageUnavailableError, exit_code_of)
    from elastic._internal.worker.failures import is_fatal

    for exc, code in [(CheckpointMismatchError("other model"), 2), (ConfigError("bad"), 2), (NoCheckpointError("x"), 2),
                      (StorageUnavailableError("x"), 2), (CheckpointCorruptError("every one failed"), 1),
                      (CheckpointFailedError("not committed"), 1), (LeaseLostError("taken over"), 1)]:
        assert is_fatal(exc) and exit_code_of(exc) == type(exc).exit_code == code, exc
    assert exit_code_of(KeyError("user code")) == 1
