"""What an exception that ended a generation means: user error, bad input, or a broken group.

Types decide wherever torch gives us one (our own WorkerGroupError, torch.distributed's DistError
family, and the runtime's collective clock, which marks a group broken the moment one of the
runtime's own collectives fails). What is left is text: gloo raises a plain RuntimeError when a
peer dies under a collective issued by user code (e.g. `dist.all_reduce(loss)` for logging), and
those messages are matched here, in one table, each with the torch version it was seen with.
"""

from __future__ import annotations

import os
import sysconfig
import traceback

import torch
import torch.distributed as dist

import elastic

from elastic.errors import (CheckpointCorruptError, CheckpointFailedError, CheckpointMismatchError, ElasticError,
                            LeaseLostError, WorkerGroupError, exception_chain)
from elastic._internal.protocol import ErrorSignature, FailureKind

# (substring, where it comes from, torch version it was seen with). Matched against the message of
# a RuntimeError in the exception's chain; never against arbitrary exception types.
GROUP_FAILURE_TEXT: tuple[tuple[str, str, str], ...] = (
    ("third_party/gloo/gloo/", "every gloo error names its source file (pair.cc, unbound_buffer.cc)", "2.13"),
    ("Connection closed by peer", "gloo pair.cc: a peer process died (SIGKILL, segfault)", "2.13"),
    ("Connection reset by peer", "gloo/socket: a peer's connection was reset", "2.13"),
    ("Application timeout caused pair closure", "gloo: a collective after a timeout on the same pair",
     "2.13"),
    ("for recv operation to complete", "gloo unbound_buffer.cc: a peer froze (SIGSTOP, a GIL hang)",
     "2.13"),
    ("for send operation to complete", "gloo unbound_buffer.cc: a peer stopped reading", "2.13"),
    ("connectFullMesh", "gloo rendezvous: a peer died while the group was being built", "2.13"),
)


def is_fatal(exc: BaseException) -> bool:
    """Errors a restart cannot fix: bad input, a checkpoint from another model, no checkpoint that
    verifies, a final checkpoint that storage would not take. Restarting on them would only burn
    the failure budget."""
    if isinstance(exc, (CheckpointMismatchError, CheckpointCorruptError, CheckpointFailedError, LeaseLostError)):
        return True
    return isinstance(exc, ElasticError) and exc.exit_code == 2


def is_group_failure(exc: BaseException) -> bool:
    """The exception (or one it was raised from) says the process group broke under this rank."""
    for e in exception_chain(exc):
        if isinstance(e, (WorkerGroupError, dist.DistError)):
            return True
        if type(e) is RuntimeError and matches_group_failure_text(str(e)):
            return True
    return False


def matches_group_failure_text(message: str) -> bool:
    return any(pattern in message for pattern, _, _ in GROUP_FAILURE_TEXT)


def classify(exc: BaseException, *, group_broken: bool) -> FailureKind:
    """group_broken: one of the runtime's own collectives of this generation already failed, so
    whatever the training function raised afterwards is a consequence, not a bug."""
    if is_fatal(exc):
        return FailureKind.FATAL
    if group_broken or is_group_failure(exc):
        return FailureKind.GROUP
    return FailureKind.USER



def _library_roots() -> tuple[str, ...]:
    """Directories whose frames are not the user's: elastic, torch, the stdlib, installed packages."""
    roots = {os.path.dirname(elastic.__file__), os.path.dirname(torch.__file__)}
    roots.update(p for k in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_paths().get(k)))
    return tuple(os.path.join(os.path.realpath(r), "") for r in roots)


def user_frame(exc: BaseException) -> str:
    """file:line of the innermost frame of `exc`'s traceback in the user's code (the innermost
    frame at all when every one is a library's; "?" without a traceback)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    roots = _library_roots()
    mine = [f for f in frames if not os.path.realpath(f.filename).startswith(roots)]
    f = (mine or frames)[-1]
    return f"{f.filename}:{f.lineno}"


def signature(exc: BaseException, *, step: int) -> ErrorSignature:
    """What identifies a user error across ranks and generations (`step`: the one being taken)."""
    lines = str(exc).strip().splitlines()
    return ErrorSignature(type=type(exc).__name__, message=lines[0] if lines else "", where=user_frame(exc), step=step)
