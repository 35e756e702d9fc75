"""Ray worker setup hooks for chaos runs (`worker_process_setup_hook`), kept free of torch.

A setup hook runs in every worker process before the actor's `__init__`, at normal CPU priority.
A standby imports torch inside `__init__` at idle priority (elastic._internal.worker.priority) so
that its start-up does not slow the training ranks; a hook that imported torch (the chaos
filesystem's module does, through elastic._internal.checkpoint) would pay that import at normal
priority in every standby, and make the standbys of chaos runs start slower, and compete harder,
than the product's own (≈ 1.9 s of a 3.4 s start-up on 2 busy cores). So the filesystem is
registered by name (fsspec imports it on first use) and the phase hooks are installed right after
the modules they wrap are imported, by whichever code imports them first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Any, Callable

PROTOCOL = "chaosfs"
STORAGE_CLASS = "elastic.chaos.storage.ChaosFileSystem"
PHASES_MODULE = "elastic._internal.worker.recovery.peer_sync"
"""The phase hooks are installed once this module is imported (elastic.chaos.phases.install wraps
it and elastic._internal.worker.groups, which it imports)."""


def storage() -> None:
    """Make `chaosfs::` URLs resolvable in this process (the class is imported on first use)."""
    import fsspec

    fsspec.register_implementation(PROTOCOL, STORAGE_CLASS, clobber=True)


def phases() -> None:
    """The chaos filesystem, and the phase hooks (elastic.chaos.phases) when they are armed."""
    from elastic.chaos.phases import ENV

    storage()
    if os.environ.get(ENV):
        after_import(PHASES_MODULE, _install_phases)


def _install_phases() -> None:
    from elastic.chaos import phases as ph

    ph.install()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then` once module `name` has been executed (then removes itself)."""

    def __init__(self, name: str, then: Callable[[], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run_module, then = spec.loader.exec_module, self.then

        def exec_module(module: Any) -> None:
            run_module(module)
            then()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def after_import(name: str, then: Callable[[], None]) -> None:
    """Call `then` right after `name` is imported in this process (at once if it already is)."""
    if name in sys.modules:
        then()
    else:
        sys.meta_path.insert(0, _AfterImport(name, then))
