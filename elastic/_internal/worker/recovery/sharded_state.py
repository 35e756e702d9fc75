"""Restoring and finally saving a sharded (FSDP2) state from what the group holds in memory.

A rank of a sharded model holds its own rows (its snapshot, taken as old rank o of an old world W0)
and a copy of one other rank's rows (buddy.py); under HSDP o is its shard coordinate and its replicas
hold the same rows, with no buddy copy. `restore` rebuilds the newest complete step onto the
new group's layout with reshard.py's plan, no storage read; `checkpoint_state` gives what this rank
writes of the newest complete step, each chunk by one of its holders, the lost ranks' chunks from
their buddies' copies. Both fall back to the newest durable checkpoint only when some rank and its
buddy were both lost.
"""

from __future__ import annotations

from typing import Any

import torch

from elastic._internal import tree
from elastic._internal.checkpoint.shards import Shards, row_chunks
from elastic._internal.checkpoint.state import like_template
from elastic._internal.tree import Path
from elastic._internal.worker.fsdp import is_sharded, local_chunk
from elastic._internal.worker.recovery import reshard


def holding(s: Any, new_rank: int) -> reshard.Holding:
    """What this rank holds: its own rows (first) and its buddy copy, complete ones only."""
    snap, buddy = s.snapshot, s.buddy
    copies: list[tuple[int, int]] = []
    old_world = 0
    if snap.step >= 0 and snap.shards and snap.origin is not None:
        copies.append((snap.origin[0], snap.step))
        if snap.previous is not None:
            copies.append((snap.origin[0], snap.previous[0]))
        old_world = snap.origin[1]
    for c in (buddy.complete, buddy.previous):
        if c is not None and (old_world in (0, c.old_world)):
            copies.append((c.old_rank, c.step))
            old_world = c.old_world
    return reshard.Holding(new_rank, old_world, tuple(copies))


def agree(groups: Any, s: Any, durable: int, last_committed: int) -> tuple[reshard.Source | None, int, int]:
    """Every rank's holdings -> (the newest complete step in memory or None, the newest durable step,
    the newest step any rank had committed)."""
    docs = groups.ctrl.all_gather_json([holding(s, groups.rank).to_json(), durable, last_committed])
    holdings = [reshard.Holding.from_json(d[0]) for d in docs]
    return reshard.choose(holdings), max(d[1] for d in docs), max(d[2] for d in docs)


def _held(s: Any, source: reshard.Source) -> dict[int, dict[Path, torch.Tensor]]:
    """The rows this rank holds at source.step, by old rank."""
    out: dict[int, dict[Path, torch.Tensor]] = {}
    snap = s.snapshot
    if snap.origin is not None and snap.step == source.step:
        out[snap.origin[0]] = dict(snap.tensors)
    elif snap.origin is not None and snap.previous is not None and snap.previous[0] == source.step:
        out[snap.origin[0]] = snap.previous[1]
    for c in (s.buddy.complete, s.buddy.previous):
        if c is not None and c.step == source.step:
            out[c.old_rank] = c.tensors
    return out


def _own_values(s: Any, step: int) -> tuple[dict[Path, torch.Tensor], list[tuple[Path, Any]]] | None:
    """This rank's own snapshot of `step` (its replicated tensors and its values), if it has it."""
    snap = s.snapshot
    if snap.step == step:
        return dict(snap.tensors), list(snap.values)
    if snap.previous is not None and snap.previous[0] == step:
        return snap.previous[1], snap.previous[2]
    return None


def restore(groups: Any, s: Any, state: Any, source: reshard.Source, layout: reshard.Layout | None = None,
            hsdp: bool = False) -> str:
    """Load source.step into `state` (already sharded for the new group, as `layout` says; default
    one run of rows per rank) from the members' memory; the source's name (label())."""
    layout = layout or reshard.Layout.flat(groups.world_size)
    template = state.state_dict()
    sharded, replicated = [], []
    for path, t in tree.tensor_leaves(template):
        (sharded if is_sharded(t) else replicated).append((path, t))
    rows = [t.shape[0] for _, t in sharded]
    targets = [local_chunk(t)[0] for _, t in sharded]
    held = _held(s, source)
    plan = reshard.pieces(rows, source, layout)
    held_lists = {o: [tensors[p] for p, _ in sharded] for o, tensors in held.items()}
    reshard.execute(plan, groups.rank, held_lists, targets, source.old_world, layout, rows, groups.ctrl)
    # Replicated tensors (a step counter per parameter, unsharded buffers) and the values come from a
    # member whose own snapshot is at this step: all ranks had the same.
    h0 = source.values_from
    own = _own_values(s, source.step) if groups.rank == h0 else None
    header = {"values": [[list(p), v] for p, v in own[1]]} if own is not None else None
    header = groups.ctrl.broadcast_json(header, h0)
    # One broadcast per dtype, not per tensor: AdamW alone has a step counter per parameter (hundreds
    # of scalars), and each collective costs a round trip.
    by_dtype: dict[torch.dtype, list[tuple[Path, torch.Tensor]]] = {}
    for path, t in replicated:
        by_dtype.setdefault(t.dtype, []).append((path, t))
    for dtype, group in by_dtype.items():
        if own is not None:
            flat = torch.cat([own[0][path].reshape(-1) for path, _ in group])
        else:
            flat = torch.empty(sum(t.numel() for _, t in group), dtype=dtype)
        groups.ctrl.broadcast_(flat, h0)
        at = 0
        with torch.no_grad():
            for _, t in group:
                t.copy_(flat[at:at + t.numel()].view(t.shape))
                at += t.numel()
    values = [(tuple(p), v) for p, v in header["values"]]
    sd = tree.build([*tree.tensor_leaves(template), *values])
    state._load_written_in_place(like_template(template, sd))  # the rows went into template's tensors
    return label(plan, source, hsdp)


def copies_in_place(source: reshard.Source, layout: reshard.Layout, buddy: list[int]) -> frozenset[int]:
    """The new ranks that already hold, as their buddy copy, their ward's rows of source.step in the
    new layout (`buddy[r]`: the rank that keeps r's copy): survivors in their old places, at the
    same world size. Their copies stay; the exchange after the restore sends only the others'."""
    if layout != reshard.Layout.flat(source.old_world):
        return frozenset()  # other rows now (or HSDP's replicas): every copy is new
    out = set()
    for r in range(len(buddy)):
        ward = buddy.index(r)
        if r in source.holders.get(ward, ()) and r not in source.owners.get(ward, ()):
            out.add(r)
    return frozenset(out)


def label(plan: list[reshard.Piece], source: reshard.Source, replicated: bool) -> str:
    """'memory': every rank had its rows; 'replica': some came from a replica's own rows (HSDP:
    the new layout is replicated, or the old one was); else 'buddy' (some came from another rank)."""
    moved = [p for p in plan if p.src != p.dst]
    if not moved:
        return "memory"
    had_replicas = replicated or any(len(o) > 1 for o in source.owners.values())
    if had_replicas and all(p.src in source.owners.get(p.old_rank, ()) for p in moved):
        return "replica"
    return "buddy"


def checkpoint_state(groups: Any, s: Any, source: reshard.Source) -> dict[str, Any]:
    """The state to write for source.step: the chunks this rank is the chosen holder of (its own, and
    a lost rank's from its buddy copy), in the old layout, plus the replicated tensors and the
    values (from the holder of old rank 0)."""
    held = _held(s, source)
    mine = [o for o, h in source.holder.items() if h == groups.rank]
    snap = s.snapshot
    own = _own_values(s, source.step) if groups.rank == source.values_from else None
    leaves: list[tuple[Path, Any]] = []
    for path, t in snap.tensors:
        if path in snap.shards:
            shape, _ = snap.shards[path]
            chunks = []
            for o in mine:
                a, _b = row_chunks(shape[0], source.old_world)[o]
                chunks.append(((a, *([0] * (len(shape) - 1))), held[o][path]))
            if chunks:
                leaves.append((path, Shards(tuple(shape), chunks)))
        elif own is not None:
            leaves.append((path, own[0][path]))
    if own is not None:
        leaves += own[1]
    return tree.build(leaves)
