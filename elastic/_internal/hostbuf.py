"""HostBuffers: host copies of named tensors, allocated once and reused while shapes stay the same.

The one host-buffer class: the in-memory snapshot a survivor hands to newcomers and the staging
area of an asynchronous checkpoint both copy into it. A copy into a warm buffer runs at memcpy
speed; a fresh allocation costs about four times as much, so buffers live as long as their tensor's
shape and dtype do. Buffers for CUDA tensors are pinned, so the copy can run asynchronously.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from elastic._internal.tree import Path


class HostBuffers:
    def __init__(self) -> None:
        self._bufs: dict[Path, torch.Tensor] = {}
        self.allocations = 0
        """Buffers allocated so far (tests check that it stops growing)."""
        self.version = 0
        """Changes whenever a buffer is allocated or freed (callers may cache lookups until then)."""

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def _buf(self, path: Path, src: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(path)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            pin = src.is_cuda and torch.cuda.is_available()
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
            self._bufs[path] = buf
            self.allocations += 1
            self.version += 1
        return buf

    def reserve(self, items: Iterable[tuple[Path, torch.Tensor]]) -> dict[Path, torch.Tensor]:
        """Buffers shaped like `items` (reused when they fit), nothing copied yet."""
        return {path: self._buf(path, t) for path, t in items}

    def copy_in(self, items: Iterable[tuple[Path, torch.Tensor]], *,
                keep: Iterable[Path] | None = None) -> list[tuple[Path, torch.Tensor]]:
        """Host copies of `items` taken now, in the same order; buffers of paths neither given nor in
        `keep` are freed. Copies from CUDA are synchronized before returning."""
        out: list[tuple[Path, torch.Tensor]] = []
        any_cuda = False
        items = list(items)
        if not items and keep is not None and len(self._bufs) <= len(keep := list(keep)):
            return out  # nothing to copy and nothing to free: the common case at every step
        with torch.no_grad():
            for path, t in items:
                src = t.detach()
                buf = self._buf(path, src)
                any_cuda = any_cuda or src.is_cuda
                buf.copy_(src, non_blocking=src.is_cuda)
                out.append((path, buf))
        if any_cuda:
            torch.cuda.synchronize()
        wanted = {p for p, _ in out} | set(keep or ())
        for stale in [p for p in self._bufs if p not in wanted]:
            del self._bufs[stale]  # keys that left the state: free their memory
            self.version += 1
        return out

    def release(self) -> None:
        if self._bufs:
            self._bufs.clear()
            self.version += 1
