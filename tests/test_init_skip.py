"""Unit: what a recovering generation no longer computes, without Ray. skip_init_if_restoring: the
first generation initialises its model exactly as without it; a generation whose restore will load
(every rank agrees) skips torch.nn.init on its own thread only, and still ends with the restored
state. The optimizer state a sharded restore needs is made on meta tensors, as torch's step makes it."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from elastic.context import get_context
from elastic._internal.worker.generation import Generation
from elastic.train_state import TrainState
from elastic._internal import tree
from elastic._internal.checkpoint.state import like_template, split_state
from elastic._internal.worker import fsdp, init_skip
from elastic._internal.worker.services import Services
from worker_threads import make_services, ok, run_generation


_RNG = threading.Lock()  # torch's default generator is the process's: one rank's build at a time


def build() -> nn.Module:
    with _RNG:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_skipping_is_per_thread_and_ends_with_the_block():
    reference = build().state_dict()
    other: dict = {}
    inside, release = threading.Event(), threading.Event()

    def elsewhere() -> None:  # another rank's thread, building while this one skips
        inside.wait(10)
        other["sd"] = build().state_dict()
        release.set()

    t = threading.Thread(target=elsewhere)
    t.start()
    with init_skip.skipping() as skipped:
        inside.set()
        release.wait(10)
        build()
    t.join(10)
    assert skipped.calls == 6  # kaiming + bias per Linear, ones + zeros for the LayerNorm
    assert all(torch.equal(reference[k], v) for k, v in other["sd"].items())
    assert all(torch.equal(reference[k], v) for k, v in build().state_dict().items())  # restored after


def _train(gen: Generation, steps: int) -> dict:
    """One rank's generation: build inside the block, restore, take `steps` steps (gen.number != 0:
    none); (whether it skipped, init calls skipped, the weights right after restore, at the end)."""
    ctx = get_context()
    with ctx.skip_init_if_restoring() as skipped:
        model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(model=model, optimizer=opt)
    ctx.restore(state)
    restored = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(steps):
        opt.zero_grad()
        model(torch.ones(3, 4)).square().sum().backward()
        opt.step()
        ctx.commit(state)
    return {"skipped": skipped, "calls": gen.init_skipped_calls, "restored": restored,
            "end": {k: v.clone() for k, v in model.state_dict().items()}}


def test_a_recovery_skips_init_and_restores_what_the_first_generation_committed(tmp_path):
    services = make_services(f"file://{tmp_path}", 2)
    first = ok(run_generation(services, lambda gen: _train(gen, 3)))
    init = build().state_dict()
    for r in range(2):  # a fresh start: nothing to load, so the block initialised as usual
        assert not first[r]["skipped"] and first[r]["calls"] == 0
        assert all(torch.equal(init[k], v) for k, v in first[r]["restored"].items())
    # Rank 1 is replaced by a newcomer that holds nothing; rank 0 survives with its snapshot.
    again = [services[0], Services(services[0].run)]
    second = ok(run_generation(again, lambda gen: _train(gen, 0), generation=1))
    for r in range(2):
        assert second[r]["skipped"] and second[r]["calls"] == 6
        assert all(torch.equal(first[0]["end"][k], v) for k, v in second[r]["restored"].items())


@pytest.fixture
def world_of_one():
    """A one-rank default group for FSDP2's mesh (the thread harness's groups are not registered)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DeviceMesh.from_group(dist.group.WORLD, "cpu")
    finally:
        dist.destroy_process_group()


def _two_groups(ps, opt_cls, **kw):
    """Matrices and vectors in groups of their own, the second with other options. (No L2 weight
    decay: torch's step at lr 0 would then leave gradient statistics of the weights, not zeros.)"""
    ps = list(ps)
    return opt_cls([{"params": [p for p in ps if p.dim() > 1]},
                    {"params": [p for p in ps if p.dim() <= 1], "lr": 0.05}], lr=0.1, **kw)


@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01),
                                      lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                      lambda ps: _two_groups(ps, torch.optim.Adam, amsgrad=True),
                                      lambda ps: _two_groups(ps, torch.optim.Adagrad)],
                         ids=["adamw", "sgd", "adam-amsgrad-2-groups", "adagrad-2-groups"])
def test_optimizer_state_made_on_meta_is_torchs_zero_step_state(world_of_one, make_opt):
    """The state dict after init_optimizer_state equals the one torch's get_state_dict makes by a
    real step at lr 0 (paths, DTensor layouts, values), parameters included; no two parameters share
    a state tensor (one stand-in serves every parameter of its kind)."""
    out = []
    for fast in (False, True):
        model = fsdp.shard(build(), world_of_one, torch.device("cpu"))
        opt = make_opt(model.parameters())
        if fast:
            fsdp.init_optimizer_state(opt)
            assert opt.state  # made here, not by get_state_dict's step
            held = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
            assert len({id(v) for v in held}) == len(held)
            assert len({(v.to_local() if fsdp.is_sharded(v) else v).data_ptr() for v in held if v.numel()}) == \
                len([v for v in held if v.numel()])
        out.append(TrainState(model=model, optimizer=opt).state_dict())

    def leaves(sd: dict) -> list:
        return [(p, type(t), t.shape, t.dtype, getattr(t, "placements", None),
                 t.full_tensor() if fsdp.is_sharded(t) else t) for p, t in tree.tensor_leaves(sd)]

    a, b = leaves(out[0]), leaves(out[1])
    assert [x[:5] for x in a] == [x[:5] for x in b] and any(x[4] for x in b)
    assert all(torch.equal(x[5], y[5]) for x, y in zip(a, b))


class _NeedsValues(torch.optim.SGD):
    """Reads a gradient's value in its step: it cannot step on meta tensors (raises midway)."""

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        for g in self.param_groups:
            for p in g["params"]:
                self.state[p]["buf"] = torch.zeros_like(p)
                float(p.grad.sum())


def test_an_optimizer_that_cannot_step_on_meta_is_left_to_torchs_step(world_of_one):
    model = fsdp.shard(build(), world_of_one, torch.device("cpu"))
    opt = _NeedsValues(model.parameters(), lr=0.1)
    fsdp.init_optimizer_state(opt)
    assert not opt.state  # no partial state: get_state_dict's own step makes all of it


def _saved(world: DeviceMesh) -> tuple[dict, list]:
    """A committed state to restore (another model's, trained one step): its tensors and values."""
    model = fsdp.shard(build(), world, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    opt.param_groups[0]["lr"] = 0.02  # a scheduler's doing: a value the restore must load
    tensors, values = split_state(TrainState(model=model, optimizer=opt, step=7, extra={"seen": 5}).state_dict())
    return {tuple(p): t.full_tensor() if fsdp.is_sharded(t) else t for p, t in tree.tensor_leaves(tensors)}, values


@pytest.mark.parametrize("in_place", [True, False], ids=["template-is-the-state", "template-copied"])
def test_a_restore_written_in_place_loads_all_but_the_model_into_itself(world_of_one, in_place):
    """What a restore does (sharded_state.restore, Restorer._restore_checkpoint): rows written into
    state.state_dict()'s tensors, then loaded.
    Written into the model's own tensors, the model's half of the load (each parameter copied into
    itself) is skipped; written into copies, it runs. Either way the state ends as the one saved."""
    want, values = _saved(world_of_one)
    model = fsdp.shard(build(), world_of_one, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    fsdp.init_optimizer_state(opt)
    state = TrainState(model=model, optimizer=opt, extra={"seen": 0})
    template = state.state_dict()
    if not in_place:
        template = tree.map_tensors(template, lambda _, t: t.clone())
    with torch.no_grad():
        for path, t in tree.tensor_leaves(template):
            (t.to_local() if fsdp.is_sharded(t) else t).copy_(want[tuple(path)])
    loads: list[str] = []
    model.register_load_state_dict_pre_hook(lambda *a, **k: loads.append("model"))
    sd = tree.build([*tree.tensor_leaves(template), *values])
    state._load_written_in_place(like_template(template, sd))
    assert loads == ([] if in_place else ["model"])
    assert state.step == 7 and state.extra == {"seen": 5} and opt.param_groups[0]["lr"] == 0.02
    got = state.state_dict()
    assert all(torch.equal(want[tuple(p)], t.full_tensor() if fsdp.is_sharded(t) else t)
               for p, t in tree.tensor_leaves(got))
    assert len(tree.tensor_leaves(got)) == len(want)
