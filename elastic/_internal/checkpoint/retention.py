"""Deleting step directories under the lease: partial ones (abandoned saves) and committed ones past
`keep_last`. Deleting is the one thing a run must never do to another run's checkpoints, so each
deletion is fenced (the run still holds its location) and re-checked right before it happens: a step
that got a manifest meanwhile, or one committed under a newer lease, is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from elastic._internal import retry
from elastic._internal.checkpoint.layout import COMMITTED
from elastic.errors import CheckpointCorruptError

if TYPE_CHECKING:
    from elastic._internal.checkpoint.catalog import CheckpointStore


def clean_partial(store: CheckpointStore, *, token: int = 0, fence: Callable[[], None] | None = None) -> list[str]:
    """Delete uncommitted step directories; the URLs removed (see CheckpointStore.clean_partial)."""
    removed = []
    for info in store.list():
        if info.status != COMMITTED and _rm_step(store, info.step, token, fence, partial=True):
            removed.append(info.uri)
    return removed


def retain(store: CheckpointStore, keep_last: int, newest: int, *, token: int = 0,
           fence: Callable[[], None] | None = None) -> list[str]:
    """Drop committed steps beyond the newest `keep_last` and partial ones older than `newest`; the
    URLs removed (see CheckpointStore.retain)."""
    infos = store.list()
    committed = [i for i in infos if i.status == COMMITTED]
    doomed = committed[:-keep_last] if keep_last > 0 else []
    if doomed:
        # The newest step that verifies is never deleted, even when newer ones are corrupt.
        good = store.latest_verified()
        doomed = [i for i in doomed if good is None or i.step != good.step]
    doomed += [i for i in infos if i.status != COMMITTED and i.step < newest]
    return [i.uri for i in doomed if _rm_step(store, i.step, token, fence, partial=i.status != COMMITTED)]


def _rm_step(store: CheckpointStore, step: int, token: int, fence: Callable[[], None] | None, *,
             partial: bool) -> bool:
    """Delete a step directory after re-checking, right before, that it is still ours to delete."""
    if fence is not None:
        fence()
    try:
        manifest = store.read_manifest(step)
    except CheckpointCorruptError:
        manifest = None
    if manifest is not None and (partial or manifest.lease > token):
        return False  # committed meanwhile, or by a newer owner of the location
    path = store.step_path(step)

    def rm() -> None:
        try:
            store.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    retry.call(retry.STORAGE_LIST, rm, op="delete", uri=path)
    return True
