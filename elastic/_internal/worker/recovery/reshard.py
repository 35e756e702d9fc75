"""Rebuilding a sharded state from what the survivors hold, for any new world size: pure plans (unit
tested without processes) and their execution over the control plane.

After a failure each survivor holds, in host memory, its own rows of every sharded tensor (its
snapshot, as old rank o) and a copy of its buddy's rows (old rank b). The group agrees on the newest
step at which every old rank's rows are held by someone, then each new rank receives exactly the rows
the new layout gives it, from whoever holds them. No rank ever gathers a whole tensor: a rank's
memory during this is its snapshot, its buddy copy and its new rows (the live model's own storage).

Under HSDP (hsdp.py) an "old rank" is a shard coordinate: every replica of it holds its rows as its
own, so a lost rank's rows are found at its replica's, and a new layout may give the same rows to
several new ranks (`Layout`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from elastic._internal.checkpoint.shards import row_chunks


@dataclass(frozen=True)
class Holding:
    """What one rank of the new group holds, as it tells the others."""

    rank: int  # its rank in the new group
    old_world: int  # world size of the generation its copies come from (0: it holds nothing)
    copies: tuple[tuple[int, int], ...]  # (old rank, step) of each complete copy: its own and its buddy's

    def to_json(self) -> list[Any]:
        return [self.rank, self.old_world, [list(c) for c in self.copies]]

    @classmethod
    def from_json(cls, doc: list[Any]) -> "Holding":
        return cls(int(doc[0]), int(doc[1]), tuple((int(o), int(s)) for o, s in doc[2]))


@dataclass(frozen=True)
class Layout:
    """How a group splits each sharded tensor: into `shards` runs of rows (row_chunks), rank r holding
    run `coords[r]`. Plain FSDP: coords = ranks; HSDP: a rank's column, repeated on every node."""

    shards: int
    coords: tuple[int, ...]

    @classmethod
    def flat(cls, world: int) -> "Layout":
        return cls(world, tuple(range(world)))

    def rows(self, n: int, rank: int) -> tuple[int, int]:
        """[start, stop) of a tensor of `n` rows that `rank` holds."""
        return row_chunks(n, self.shards)[self.coords[rank]]


def _layout(new: "Layout | int") -> Layout:
    return new if isinstance(new, Layout) else Layout.flat(new)


@dataclass(frozen=True)
class Source:
    """The step to restore and, for every old rank, the new rank that sends its rows."""

    step: int
    old_world: int
    holder: dict[int, int]  # old rank -> new rank holding its rows at `step`
    values_from: int = 0
    """A new rank whose own snapshot is at `step`: it sends the replicated tensors and the values."""
    owners: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """old rank -> every new rank holding its rows at `step` as its own (its replicas), rank order."""
    holders: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """old rank -> every new rank holding its rows at `step`: owners first, then buddy copies."""

    def sender(self, old_rank: int, dst: int) -> int:
        """Who sends old rank `old_rank`'s rows to new rank `dst`: dst itself when it holds them,
        else an owner (spread over them by dst), else the chosen holder. Deterministic."""
        held = self.holders.get(old_rank, ())
        if dst in held:
            return dst
        pool = self.owners.get(old_rank, ())
        return pool[dst % len(pool)] if pool else self.holder[old_rank]


def choose(holdings: list[Holding]) -> Source | None:
    """The newest step at which every old rank's rows are held by a member of the new group
    (preferring each old rank's own survivor), or None when no step is complete."""
    worlds = {h.old_world for h in holdings if h.old_world > 0}
    if len(worlds) != 1:
        return None  # nothing held, or copies from different generations: not one consistent state
    old_world = worlds.pop()
    steps = sorted({s for h in holdings for _, s in h.copies}, reverse=True)
    for step in steps:
        holder: dict[int, int] = {}
        for h in sorted(holdings, key=lambda h: h.rank):
            for o, s in h.copies:
                if s != step:
                    continue
                own = h.copies and h.copies[0][0] == o
                if o not in holder or own:
                    holder[o] = h.rank
        own = [h.rank for h in sorted(holdings, key=lambda h: h.rank)
               if any(o == h.copies[0][0] and s == step for o, s in h.copies)]
        if all(o in holder for o in range(old_world)) and own:
            owners, holders = _holders(holdings, step)
            return Source(step, old_world, holder, values_from=own[0], owners=owners, holders=holders)
    return None


def _holders(holdings: list[Holding], step: int) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
    """(old rank -> new ranks holding its rows at `step` as their own; -> all holders, owners first)."""
    owners: dict[int, list[int]] = {}
    copies: dict[int, list[int]] = {}
    for h in sorted(holdings, key=lambda h: h.rank):
        for o, s in h.copies:
            if s == step:
                target = owners if o == h.copies[0][0] else copies
                if h.rank not in target.setdefault(o, []):
                    target[o].append(h.rank)
    holders = {o: tuple(owners.get(o, []) + [r for r in copies.get(o, []) if r not in owners.get(o, [])])
               for o in set(owners) | set(copies)}
    return {o: tuple(r) for o, r in owners.items()}, holders


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one tensor: from the holder of `old_rank` to new rank `dst`."""

    tensor: int  # index in the agreed tensor order
    src: int  # new rank that sends (holds old rank `old_rank`'s rows)
    dst: int  # new rank that receives
    old_rank: int
    start: int
    stop: int


def pieces(rows: list[int], source: Source, new: Layout | int) -> list[Piece]:
    """Every transfer the new layout (or new world size) needs, in one deterministic order (the same
    on every rank): for each tensor (its number of rows given), for each new rank, the overlaps with
    each old rank's rows. Replicas in the new layout each get their rows."""
    layout = _layout(new)
    out: list[Piece] = []
    for i, n in enumerate(rows):
        old = row_chunks(n, source.old_world)
        for dst in range(len(layout.coords)):
            a1, b1 = layout.rows(n, dst)
            for o, (a0, b0) in enumerate(old):
                start, stop = max(a0, a1), min(b0, b1)
                if start < stop:
                    out.append(Piece(i, source.sender(o, dst), dst, o, start, stop))
    return out


def execute(plan: list[Piece], me: int, held: Mapping[int, list[torch.Tensor]], targets: list[torch.Tensor],
            old_world: int, new: Layout | int, rows: list[int], ctrl: Any) -> int:
    """Move the rows: `held[o][i]` is old rank o's rows of tensor i (for the old ranks this rank
    sends), `targets[i]` this rank's new rows of tensor i (written in place). Receives are posted
    first, then sends, then all are awaited; each message is one contiguous run of rows, sent
    without a copy. Returns the bytes this rank received from others."""
    layout = _layout(new)
    works = []
    received = 0
    for tag, p in enumerate(plan):
        if p.dst != me or p.src == me:
            continue
        a1 = layout.rows(rows[p.tensor], me)[0]
        view = targets[p.tensor][p.start - a1: p.stop - a1]
        works.append(ctrl.recv(view, p.src, tag))
        received += view.numel() * view.element_size()
    for tag, p in enumerate(plan):
        if p.src != me:
            continue
        a0 = row_chunks(rows[p.tensor], old_world)[p.old_rank][0]
        rows_held = held[p.old_rank][p.tensor][p.start - a0: p.stop - a0]
        if p.dst == me:
            a1 = layout.rows(rows[p.tensor], me)[0]
            with torch.no_grad():
                targets[p.tensor][p.start - a1: p.stop - a1].copy_(rows_held)
        else:
            works.append(ctrl.send(rows_held.contiguous(), p.dst, tag))
    for w in works:
        w.wait()
    return received


def buddies(nodes: list[str]) -> list[int]:
    """Each rank's buddy (the rank that keeps a copy of its rows), on another node whenever the group
    spans nodes: a lost node must not take a rank and its buddy together. A permutation without
    fixed points (so every rank keeps exactly one copy), a pure function of the ranks' nodes."""
    n = len(nodes)
    if n < 2:
        return [0] * n
    order = sorted(range(n), key=lambda r: (nodes[r], r))  # ranks grouped by node
    largest = max(sum(1 for x in nodes if x == node) for node in set(nodes))
    # Shift by the largest node's rank count along the node-grouped order: a rank's buddy then sits
    # on another node, unless one node holds more than half of the ranks (then some cannot).
    shift = largest if largest < n else 1
    buddy = [0] * n
    for i, r in enumerate(order):
        buddy[r] = order[(i + shift) % n]
    return buddy
