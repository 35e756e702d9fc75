"""Building a model without initialising its weights, for a generation whose restore will overwrite
them (WorkerContext.skip_init_if_restoring): on a recovery the survivors and the newcomer would
otherwise spend most of a second (25 M parameters, one core) drawing random weights that the state
from memory replaces a moment later.

Only `torch.nn.init`'s public functions are skipped (what nn.Linear, nn.Embedding, nn.LayerNorm,
nn.Conv* call from reset_parameters), and only on the thread inside the block: tensors are still
allocated where they would be, and buffers are still computed as usual, so a non-persistent buffer
(not in the state dict, never restored) is the same as in a fresh build. This is what Hugging Face's
`no_init_weights` does. Other threads (other ranks of a test process) see the real functions.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn.init as nn_init

_local = threading.local()
_lock = threading.Lock()
_users = 0
_originals: dict[str, Callable[..., Any]] = {}


@dataclass
class Skipped:
    """How many init calls a block skipped (tests and stats read it)."""

    calls: int = 0


def _public_inits() -> list[str]:
    return [n for n in dir(nn_init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn_init, n))]


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def maybe_skip(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        counter = getattr(_local, "skipped", None)
        if counter is None:
            return fn(tensor, *args, **kwargs)
        counter.calls += 1
        return tensor

    return maybe_skip


def _install() -> None:
    global _users
    with _lock:
        if _users == 0:  # wrappers stay in place while any thread is inside a block
            for name in _public_inits():
                _originals[name] = getattr(nn_init, name)
                setattr(nn_init, name, _wrap(_originals[name]))
        _users += 1


def _uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            for name, fn in _originals.items():
                setattr(nn_init, name, fn)
            _originals.clear()


@contextlib.contextmanager
def skipping() -> Iterator[Skipped]:
    """Within the block, on this thread, torch.nn.init's functions return their tensor unchanged."""
    if getattr(_local, "skipped", None) is not None:  # nested: the outer block counts
        yield _local.skipped
        return
    counter = Skipped()
    _install()
    _local.skipped = counter
    try:
        yield counter
    finally:
        _local.skipped = None
        _uninstall()
