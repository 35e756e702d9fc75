"""The commit protocol between ranks, over a torch.distributed Store that outlives process groups.

After a rank's shards are durable it publishes `rank{r}` (its files, checksums and DCP write
results, or the error it hit) under a key space unique to the save. The coordinator waits for
every rank, bounded and cancellable, then commits and publishes `verdict`. Nothing here touches a
process group: the group may be destroyed at any moment after save() returns.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from torch.distributed import Store

from elastic._internal.waiting import wait_until

KEY_ROOT = "elastic_ckpt"


class Cancelled(Exception):
    """cancel_pending() was called: stop waiting, never commit."""


def key(save_id: str, name: str) -> str:
    return f"{KEY_ROOT}/{save_id}/{name}"


def publish(store: Store, save_id: str, name: str, doc: dict[str, Any]) -> None:
    store.set(key(save_id, name), json.dumps(doc))


def read(store: Store, save_id: str, name: str) -> dict[str, Any]:
    raw = store.get(key(save_id, name))
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def wait_keys(
    store: Store, save_id: str, names: list[str], *, timeout_s: float, cancel: threading.Event,
    what: str,
) -> None:  # fmt: skip
    """Wait until every key exists; Cancelled on cancel, TimeoutError past the bound.

    Polls with store.check (non-blocking) rather than store.wait so that a cancel is seen within
    one poll interval; the interval grows from 10 ms to 200 ms to keep the store quiet.
    """
    keys = [key(save_id, n) for n in names]
    if wait_until(lambda: cancel.is_set() or store.check(keys), timeout_s=timeout_s, interval_s=0.01,
                  backoff=1.5, max_interval_s=0.2, sleep=cancel.wait):
        if cancel.is_set():
            raise Cancelled()
        return
    if cancel.is_set():
        raise Cancelled()
    missing = [n for n, k in zip(names, keys) if not store.check([k])]
    raise TimeoutError(f"no {what} after {timeout_s:.0f}s from {', '.join(missing)}")


def cleanup(store: Store, save_id: str, names: list[str]) -> None:
    """Delete per-rank keys once the verdict is out (the verdict stays: late readers need it)."""
    for n in names:
        try:
            store.delete_key(key(save_id, n))
        except Exception:  # noqa: BLE001 - some stores cannot delete; the keys are tiny
            pass
