"""Unit: a survivor's sharded model kept across a recovery (kept_model.py), on real FSDP2 and a real
process group that is destroyed and created again (a world of one, as a generation's is). The kept
model, reset after a backward cut short, stripped of the hooks the last generation added, and
pointed at the new group, trains on to exactly what a model never interrupted reaches; a model of
another structure or place is not kept; the model prepare_model did not use refuses to train."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from elastic.errors import ConfigError
from elastic._internal.collectives import CollectiveClock
from elastic._internal.worker import fsdp, kept_model
from elastic._internal.worker.groups import ProcessGroups
from elastic._internal.worker.model_prep import ModelPrep

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not kept_model.supported(), reason="torch without FSDPModule.reset_iter_state")]


def _group() -> DeviceMesh:
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return DeviceMesh.from_group(dist.group.WORLD, "cpu")


@pytest.fixture
def generations():
    """A new default group per call (what each generation gets); destroyed at the end."""
    try:
        yield _group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def build(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


def _prepared(mesh: DeviceMesh) -> tuple[nn.Module, kept_model.KeptModel]:
    model = build()
    built = kept_model.structure(model)
    fsdp.shard(model, mesh, torch.device("cpu"))
    return model, kept_model.record(model, mesh, ("fsdp", kept_model.mesh_place(mesh)), built)


def _step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def test_a_kept_model_trains_on_as_if_never_interrupted(generations):
    # Never interrupted: 4 steps, a new group after the second.
    straight, _ = _prepared(generations())
    opt = torch.optim.AdamW(straight.parameters(), lr=0.01)
    for step in range(2):
        _step(straight, opt, step)
    _group()
    for step in range(2, 4):
        _step(straight, opt, step)

    model, kept = _prepared(generations())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step in range(2):
        _step(model, opt, step)
    # What the generation added after prepare_model, then a step cut short inside its backward (a
    # peer lost in a reduce-scatter): FSDP2 mid-backward, gradients on some parameters.
    model.register_forward_hook(lambda _m, _i, out: out * 2)

    def lost_peer(*_):
        raise RuntimeError("peer lost")

    model[2].register_full_backward_hook(lost_peer)
    with pytest.raises(RuntimeError, match="peer lost"):
        model(torch.randn(6, 8)).square().mean().backward()
    assert any(p.grad is not None for p in model.parameters())
    kept.optimizer = opt

    mesh = generations()  # the next generation: the old group destroyed, a new one
    built = build()
    again = kept_model.reuse(kept, built, mesh, ("fsdp", kept_model.mesh_place(mesh)), kept_model.structure(built))
    assert again is model
    assert all(p.grad is None for p in model.parameters())
    group = model[0].weight.device_mesh.get_group()
    assert group is dist.group.WORLD  # the DTensors' mesh now names this generation's group
    assert model[0]._get_fsdp_state()._fsdp_param_groups[0].mesh_info.shard_process_group is dist.group.WORLD
    with pytest.raises(ConfigError, match="train the returned model"):
        built(torch.randn(2, 8))  # the model the training function built is not trained by mistake

    opt2 = torch.optim.AdamW(model.parameters(), lr=0.01)
    assert kept_model.adopt_optimizer_state(opt2, kept.optimizer)
    assert all(opt2.state[p]["exp_avg"] is opt.state[p]["exp_avg"] for p in model.parameters())
    for step in range(2, 4):
        _step(model, opt2, step)
    ref, got = _weights(straight), _weights(model)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_model_of_another_structure_or_place_is_not_kept(generations):
    model, kept = _prepared(generations())
    mesh = generations()
    place = ("fsdp", kept_model.mesh_place(mesh))
    wider = build(width=32)
    assert kept_model.reuse(kept, wider, mesh, place, kept_model.structure(wider)) is None
    same = build()
    assert kept_model.reuse(kept, same, mesh, ("hsdp", kept_model.mesh_place(mesh)),
                            kept_model.structure(same)) is None
    wider(torch.randn(2, 8))  # not retired: it is the one that gets sharded


def test_an_optimizer_takes_the_kept_state_only_for_the_same_parameters_and_options(generations):
    model, _ = _prepared(generations())
    old = torch.optim.AdamW(model.parameters(), lr=0.01)
    _step(model, old, 0)
    assert not kept_model.adopt_optimizer_state(torch.optim.AdamW(model.parameters(), amsgrad=True), old)
    assert not kept_model.adopt_optimizer_state(torch.optim.SGD(model.parameters(), lr=0.1), old)
    assert not kept_model.adopt_optimizer_state(torch.optim.AdamW(list(model.parameters())[:-1]), old)
    assert kept_model.adopt_optimizer_state(torch.optim.AdamW(model.parameters(), lr=0.5), old)  # lr: restored


def _prep(slot: kept_model.Slot) -> ModelPrep:
    groups = ProcessGroups(generation=0, rank=0, world_size=1, train=dist.group.WORLD, ctrl=None, ckpt_store=None)
    return ModelPrep(groups, torch.device("cpu"), CollectiveClock(), kept=slot)


def test_a_model_is_kept_only_from_a_broken_or_paused_generation_and_only_for_a_restore(generations):
    slot = kept_model.Slot()
    generations()
    first = _prep(slot)
    model = first.prepare(build(), "fsdp", will_load=lambda: False)
    first.release(keep=True)  # broken or paused: kept
    generations()
    fresh = _prep(slot)  # nothing to restore (nobody committed a step): the kept weights are not trained on
    assert fresh.prepare(build(), "fsdp", will_load=lambda: False) is not model and not fresh.reused
    fresh.release(keep=True)
    generations()
    again = _prep(slot)
    model = again.prepare(build(), "fsdp", will_load=lambda: True)
    assert again.reused  # the model `fresh` sharded and kept
    again.release(keep=False)  # failed or finished: nothing kept
    generations()
    last = _prep(slot)
    assert last.prepare(build(), "fsdp", will_load=lambda: True) is not model and not last.reused
