"""Several ranks of the worker side in one process: one thread per rank, real gloo groups over
loopback, an in-process store, no Ray. What the worker unit tests build on."""

from __future__ import annotations

import threading
import traceback
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.distributed as dist

from elastic.config import CheckpointConfig, FailureConfig, RunConfig
from elastic._internal.protocol import Assignment
from elastic.context import WorkerContext, set_context
from elastic._internal.worker.generation import Generation
from elastic._internal.worker.groups import connect
from elastic._internal.worker.services import Services


def make_services(uri: str, n: int, **checkpoint: Any) -> list[Services]:
    run = RunConfig(checkpoint=CheckpointConfig(uri=uri, **{"every_n_steps": 0, **checkpoint}),
                    failure=FailureConfig(collective_timeout_s=20))
    return [Services(run) for _ in range(n)]


def run_generation(services: list[Services], fn: Callable[[Generation], Any], *, generation: int = 0,
                   store: Any = None, prefix: str = "", timeout_s: float = 60.0) -> list[Any]:
    """fn(generation) on every rank, each in its own thread, one generation of len(services)
    ranks; the results in rank order (a rank that raised returns its exception)."""
    store = store if store is not None else dist.HashStore()
    n = len(services)
    results: list[Any] = [None] * n

    def rank(r: int) -> None:
        a = Assignment(generation=generation, rank=r, world_size=n, store_host="", store_port=0, backend="gloo",
                       collective_timeout_s=services[r].run.failure.collective_timeout_s, store_prefix=prefix)
        gen = None
        try:
            groups = connect(a, services[r].clock, store=store, as_default=False)
            gen = Generation(groups, torch.device("cpu"), services[r])
            set_context(WorkerContext(gen))
            results[r] = fn(gen)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            exc.add_note(traceback.format_exc())
            results[r] = exc
        finally:
            set_context(None)
            if gen is not None:
                gen.release()

    in_threads(n, rank, timeout_s)
    return results


def in_threads(n: int, rank: Callable[[int], Any], timeout_s: float = 30.0) -> None:
    """Run rank(r) for r in range(n), one thread each (ranks of a group in one process), and fail
    the test if one is still running after timeout_s (a hung collective, not a hung suite)."""
    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    assert not any(t.is_alive() for t in threads), f"ranks did not finish within {timeout_s}s"


def ok(results: list[Any]) -> list[Any]:
    for r, value in enumerate(results):
        if isinstance(value, BaseException):
            raise AssertionError(f"rank {r} raised {value!r}\n{''.join(getattr(value, '__notes__', []))}")
    return results


def with_run(services: list[Services], **failure: Any) -> list[Services]:
    for s in services:
        s.run = replace(s.run, failure=replace(s.run.failure, **failure))
    return services
