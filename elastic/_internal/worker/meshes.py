"""One DeviceMesh object per mesh and thread, across generations.

DTensor caches how each op shards, per thread, keyed by mesh equality: a mesh compares equal to any
other with the same ranks, shape and names, whatever its process groups and whichever rank built
it. The cached results carry the mesh object first seen, and so do the DTensors made from them, even
`nn.Parameter(dtensor)` (a detach). On a worker's long-lived generation thread (runtime.py), a new
generation's parameters came out on an older generation's mesh object: its process groups
destroyed, its coordinate the rank this worker had then. Measured: a worker at rank 2 of a mesh
equal to one it had been rank 1 of declared rank 1's rows, and DCP refused the checkpoint's plan.
So each generation's mesh is made the object first built for it on this thread: that object takes
the new one's process groups and coordinate, and every cached result is right again.
"""

from __future__ import annotations

import threading
from typing import Any

_local = threading.local()


def canonical(mesh: Any) -> Any:
    """The mesh object first built equal to `mesh` on this thread, now with `mesh`'s process groups
    and this rank's coordinate in it (`mesh` itself the first time)."""
    seen: dict[Any, Any] = getattr(_local, "meshes", None) or {}
    _local.meshes = seen
    first = seen.setdefault(mesh, mesh)
    adopt(first, mesh)
    return first


def adopt(old: Any, new: Any) -> None:
    """Make `old` (a mesh equal to `new`) stand for `new`: its process groups, rank and coordinate."""
    if old is not new:
        old.__dict__.update(new.__dict__)
