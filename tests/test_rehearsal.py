"""Unit: a standby's rehearsal of the job's optimizer step (rehearsal.py). After it, the first real
step on the same thread, on a new process group and a model sharded afresh, works out no DTensor
sharding at all; without it, every op of the step is worked out. What cannot be rehearsed is not."""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from elastic._internal.worker import fsdp, meshes, rehearsal
from elastic._internal.worker.fsdp import local_chunk

pytestmark = pytest.mark.timeout(60)


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _sharded(world: int, rank: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model sharded on a fake group of `world` ranks (torch's "fake" backend), and its AdamW."""
    __import__("torch.testing._internal.distributed.fake_pg")
    dist.init_process_group("fake", rank=rank, world_size=world, store=dist.HashStore())
    mesh = meshes.canonical(DeviceMesh.from_group(dist.group.WORLD, "cpu"))  # as ModelPrep builds it
    model = fsdp.shard(build(), mesh, torch.device("cpu"))
    return model, torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() > 1]},
                                     {"params": [p for p in model.parameters() if p.dim() <= 1], "lr": 0.5}],
                                    lr=1e-3, weight_decay=0.01)


def _worked_out_in_first_step(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """How many ops' sharding DTensor works out (cache misses) in the optimizer's first step."""
    propagator = DTensor._op_dispatcher.sharding_propagator
    calls = 0
    uncached = propagator.propagate_op_sharding_non_cached

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return uncached(*args, **kwargs)

    for p in model.parameters():
        p.grad = torch.ones_like(p)
    propagator.propagate_op_sharding_non_cached = counted
    try:
        opt.step()
    finally:
        del propagator.propagate_op_sharding_non_cached  # back to the class's method
    return calls


def _on_a_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a new thread (DTensor's sharding cache is per thread: each case starts empty)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    t = threading.Thread(target=run)
    t.start()
    t.join(50)
    assert not t.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _layout() -> dict:
    model, opt = _sharded(4, 1)
    layout = rehearsal.describe(opt)
    dist.destroy_process_group()
    assert layout is not None and layout["mesh"]["ranks"] == [0, 1, 2, 3]
    return layout


def test_after_a_rehearsal_the_first_step_works_out_no_sharding():
    layout = _on_a_thread(_layout)

    def cold() -> int:
        return _worked_out_in_first_step(*_sharded(4, 2))

    def rehearsed() -> int:
        assert rehearsal.rehearse(layout)  # as rank 0 of a fake group
        assert not dist.is_initialized()  # its fake group is gone again
        model, opt = _sharded(4, 2)  # another rank's place: the same entries
        assert _declares_its_own_rows(model, 2)  # not the rehearsal's rank 0, nor its group
        return _worked_out_in_first_step(model, opt)

    assert _on_a_thread(cold) > 0
    assert _on_a_thread(rehearsed) == 0


def _declares_its_own_rows(model: nn.Module, rank: int) -> bool:
    """Every parameter says it holds rank `rank`'s rows (of 4), on this generation's group."""
    return all(local_chunk(p)[1][0] == rank * (p.shape[0] // 4) and p.device_mesh.get_group() is dist.group.WORLD
               for p in model.parameters())


def test_each_generation_declares_its_own_rank_on_a_mesh_seen_before():
    """A worker's generations run on one thread, where DTensor's cache hands out the mesh object it
    first saw for an equal mesh: without meshes.canonical the second model below declares rank 1's
    rows (DCP then refuses the checkpoint's plan: "invalid fill")."""

    def generations() -> list[bool]:
        out = []
        for rank in (1, 2, 3):
            model, _ = _sharded(4, rank)
            out.append(_declares_its_own_rows(model, rank))
            dist.destroy_process_group()
        return out

    assert _on_a_thread(generations) == [True, True, True]


class _Custom(torch.optim.SGD):
    pass


def test_what_cannot_be_rehearsed_is_not():
    assert rehearsal.describe(None) is None
    plain = build()
    assert rehearsal.describe(torch.optim.SGD(plain.parameters(), lr=0.1)) is None  # no DTensors

    def custom() -> dict | None:
        model, _ = _sharded(2, 0)
        return rehearsal.describe(_Custom(model.parameters(), lr=0.1))  # not torch.optim's: never imported

    assert _on_a_thread(custom) is None

    def while_a_group_is_up() -> bool:
        _sharded(4, 0)
        return rehearsal.rehearse(layout)

    layout = _on_a_thread(_layout)
    assert _on_a_thread(while_a_group_is_up) is None


def test_a_rehearsal_sizes_the_buddy_slot_a_rank_of_its_layout_writes():
    """What a standby stocks its slots by (host_slots.SlotWriter.stock): the bytes of rank 0's rows
    (the most of any rank) of every parameter and AdamW state, as a real sharded step holds them."""
    from elastic._internal.worker.recovery import host_slots

    layout = _on_a_thread(_layout)

    def real() -> int:
        model, opt = _sharded(4, 0)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        rows = [(("x",), tuple(t.to_local().shape), t.dtype) for p in model.parameters()
                for t in [p, *opt.state[p].values()] if isinstance(t, DTensor) and t.shape == p.shape]
        assert len(rows) == 3 * len(list(model.parameters()))
        return host_slots._offsets(rows)[1]

    assert _on_a_thread(lambda: rehearsal.rehearse(layout)) == _on_a_thread(real) > 0
