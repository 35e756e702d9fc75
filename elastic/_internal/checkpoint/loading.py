"""Loading a committed step: its manifest and DCP metadata verified before anything is read, then
the tensors in place (falling back to an older step when a file is missing or corrupt), or the whole
state, whatever world size wrote it (the CLI's export, the tests' comparisons).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from elastic._internal.checkpoint import dcp_read
from elastic._internal.checkpoint.layout import COMMITTED, DCP_METADATA, CheckpointInfo, Manifest
from elastic._internal.checkpoint.state import apply_values, check_tensors_match, split_state
from elastic.errors import CheckpointCorruptError, NoCheckpointError

if TYPE_CHECKING:
    from elastic._internal.checkpoint.catalog import CheckpointStore

log = logging.getLogger(__name__)


def open_step(store: CheckpointStore, step: int) -> tuple[Manifest, Metadata]:
    """The manifest and the DCP metadata of a committed step, the metadata checked against the
    manifest; NoCheckpointError when the step is not committed, CheckpointCorruptError when torn."""
    where = store.step_uri(step)
    manifest = store.read_manifest(step)
    if manifest is None:
        raise NoCheckpointError(f"no committed checkpoint at {where}")
    path = store.step_path(step)
    raw = dcp_read.read_verified(store.fs, path, DCP_METADATA, manifest.files, where, manifest.checksum)
    return manifest, dcp_read.load_metadata(raw, where)


def _reader(store: CheckpointStore, step: int, manifest: Manifest, md: Any) -> dcp_read.VerifyingReader:
    return dcp_read.VerifyingReader(
        store.fs, store.step_path(step), manifest.files, md, store.step_uri(step), manifest.checksum
    )


def load_into(
    store: CheckpointStore, state: dict[str, Any], step: int | None = None, *, fallback: bool | None = None
) -> CheckpointInfo | None:
    """Load `state` in place (see CheckpointStore.load_into)."""
    if fallback is None:
        fallback = step is None
    committed = [i for i in store.list() if i.status == COMMITTED]
    if step is not None:
        if not any(i.step == step for i in committed):
            raise NoCheckpointError(f"no committed checkpoint at {store.step_uri(step)}")
        committed = [i for i in committed if (i.step <= step if fallback else i.step == step)]
    tensors, _ = split_state(state)
    skipped: list[int] = []
    errors: list[str] = []
    for info in reversed(committed):
        try:
            manifest, md = open_step(store, info.step)
            check_tensors_match(tensors, md, info.uri)
            apply_values(state, manifest.values, info.uri, check_only=True)
            dcp_read.run_load(tensors, _reader(store, info.step, manifest, md),
                              dcp_read.default_load_planner())  # fmt: skip
            apply_values(state, manifest.values, info.uri)
            return dataclasses.replace(info, skipped=tuple(skipped))
        except CheckpointCorruptError as exc:
            if not fallback:
                raise
            log.warning("skipping checkpoint step %d, falling back to an older one: %s",
                        info.step, exc)  # fmt: skip
            skipped.append(info.step)
            errors.append(str(exc))
    if not committed:
        return None
    raise CheckpointCorruptError(
        f"every committed checkpoint under {store.uri} failed verification "
        f"({'; '.join(errors)}); the state may be partly overwritten: start from scratch or "
        "restore the files"
    )


def load_full(store: CheckpointStore, step: int | None = None) -> dict[str, Any]:
    """The whole state of `step` (default: newest committed) as one nested dict (see
    CheckpointStore.load_full)."""
    if step is None:
        latest = store.latest()
        if latest is None:
            raise NoCheckpointError(f"no committed checkpoint under {store.uri}")
        step = latest.step
    manifest, md = open_step(store, step)
    # Every tensor the metadata lists, whole (DCP merges the shards into it), under its flat
    # name; then nested along the paths DCP recorded at save time.
    flat = {fqn: torch.empty(m.size, dtype=m.properties.dtype) for fqn, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}
    dcp_read.run_load(flat, _reader(store, step, manifest, md), DefaultLoadPlanner(flatten_state_dict=False))
    state: dict[str, Any] = {}
    paths = md.planner_data or {}
    for fqn, tensor in flat.items():
        _put(state, paths.get(fqn) or tuple(fqn.split(".")), tensor)
    for path, value in manifest.values:
        _put(state, path, value)
    return state


def _put(state: dict[str, Any], path: tuple[str, ...] | list[str], value: Any) -> None:
    """state[path[0]][path[1]]... = value, creating the dicts on the way."""
    parent = state
    for key in path[:-1]:
        parent = parent.setdefault(key, {})
    parent[path[-1]] = value
