"""Unit: the overlapped snapshot equals a synchronous copy; one host copy for checkpoints; the capture
plan never walks the state dict again once bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from elastic._internal import tree

from elastic import TrainState
from elastic._internal.checkpoint.state import split_state
from elastic._internal.worker.capture import CapturePlan
from elastic._internal.worker.snapshot import Snapshot

pytestmark = pytest.mark.timeout(60)


def make_state(batchnorm: bool) -> TrainState:
    torch.manual_seed(0)
    layers = [nn.Linear(16, 64)] + ([nn.BatchNorm1d(64)] if batchnorm else [nn.LayerNorm(64)]) + \
        [nn.ReLU(), nn.Linear(64, 8)]
    model = nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return TrainState(model=model, optimizer=opt, extra={"sched": sched, "seen": torch.zeros(2)})


def forward_backward(state: TrainState, step: int, micro: int) -> None:
    for m in range(micro):  # gradient accumulation: several backward passes per optimizer step
        x = torch.randn(12, 16, generator=torch.Generator().manual_seed(10 * step + m))
        state.model(x).square().mean().backward()
    state.extra["seen"] += 1


def synchronous(state: TrainState) -> tuple[dict, list]:
    tensors, values = split_state(state.state_dict())
    return {p: t.clone() for p, t in tree.tensor_leaves(tensors)}, values


@pytest.mark.parametrize("batchnorm,micro", [(True, 1), (False, 3)], ids=["batchnorm", "accumulation"])
def test_an_overlapped_snapshot_equals_a_synchronous_copy(batchnorm, micro):
    state = make_state(batchnorm)
    plan = CapturePlan(state)
    snap = Snapshot()
    for step in range(6):
        state.optimizer.zero_grad()
        forward_backward(state, step, micro)
        state.optimizer.step()
        state.extra["sched"].step()
        state.step += 1
        expected = synchronous(state)  # what a copy taken right now holds
        items = plan.items()
        snap.capture_items(items.stable, items.volatile, items.values, state.step)
        # The next step's forward and backward run while the copy is in flight: they change the
        # BatchNorm statistics (copied at once) and the gradients, not parameters or optimizer state.
        state.optimizer.zero_grad()
        forward_backward(state, step + 100, micro)
        got_tensors, got_values = split_state(snap.state_dict())
        got = dict(tree.tensor_leaves(got_tensors))
        assert got.keys() == expected[0].keys()
        for p, t in expected[0].items():
            assert torch.equal(got[p], t), p
        assert dict(got_values) == dict(expected[1])
    assert plan.binds == 1 and plan.fast  # the state dict was walked once, not at every commit


def test_a_replaced_optimizer_tensor_is_noticed_and_the_plan_binds_again():
    state = make_state(False)
    plan = CapturePlan(state)
    first = state.optimizer.state[next(iter(state.optimizer.state))]
    first["exp_avg"] = first["exp_avg"].clone()  # an optimizer that reallocates its state
    items = plan.items()
    assert plan.binds == 2
    assert any(t is first["exp_avg"] for _, t in items.stable)


def test_one_host_copy_while_no_save_is_in_flight_and_two_while_one_is():
    state = make_state(False)
    plan = CapturePlan(state)
    snap = Snapshot()
    size = sum(t.numel() * t.element_size() for _, t in plan.items().stable + plan.items().volatile)

    def capture(step: int) -> None:
        items = plan.items()
        snap.capture_items(items.stable, items.volatile, items.values, step)
        snap.wait()

    capture(1)
    assert snap.nbytes == size
    which = snap.pin()  # a checkpoint writes from the step-1 buffers...
    pinned = [t for _, t in snap.tensors]
    capture(2)  # ...so step 2 goes to the other set: never blocked, never skipped
    assert snap.nbytes == 2 * size and snap.step == 2
    assert all(a.data_ptr() != b.data_ptr() for a, (_, b) in zip(pinned, snap.tensors))
    snap.unpin(which)  # the save ended: the set that no longer holds the newest snapshot is freed
    assert snap.nbytes == size
    capture(3)
    assert snap.nbytes == size


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_values_are_read_directly_for_plain_states_too(optim):
    """The fast path (no state-dict walk per commit) holds for a state with no `extra`, with SGD's
    momentum as with AdamW, and gives exactly what the full walk gives."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters()) if optim == "adamw" else \
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = TrainState(model=model, optimizer=opt)
    plan = CapturePlan(state)
    assert plan.fast and plan.items().values == split_state(state.state_dict())[1]


@pytest.mark.parametrize("batchnorm", [True, False], ids=["batchnorm", "layernorm"])
def test_a_live_snapshot_holds_the_committed_step_until_the_optimizer_steps(batchnorm):
    """Live: nothing stable is copied (host memory: the volatile tensors); between the commit and
    the next optimizer.step() the snapshot equals a synchronous copy (forward changed only what was
    copied: BatchNorm statistics, `extra`); once the optimizer steps it holds no step at all."""
    state = make_state(batchnorm)
    plan = CapturePlan(state)
    snap = Snapshot()
    for step in range(4):
        state.optimizer.zero_grad()
        forward_backward(state, step, 1)
        state.optimizer.step()
        state.extra["sched"].step()
        state.step += 1
        expected = synchronous(state)
        items = plan.items()
        snap.capture_items(items.stable, items.volatile, items.values, state.step, live=True)
        assert snap.nbytes == sum(t.numel() * t.element_size() for _, t in items.volatile)
        state.optimizer.zero_grad()
        forward_backward(state, step + 100, 1)  # the next step, up to its optimizer.step()
        assert snap.held_step() == state.step
        got_tensors, got_values = split_state(snap.state_dict())
        got = dict(tree.tensor_leaves(got_tensors))
        assert all(torch.equal(got[p], t) for p, t in expected[0].items())
        assert dict(got_values) == dict(expected[1])
    state.optimizer.step()
    assert snap.held_step() == -1


def test_a_checkpoint_copy_between_live_snapshots_is_freed_when_its_save_ends():
    state = make_state(False)
    plan = CapturePlan(state)
    snap = Snapshot()
    items = plan.items()
    size = sum(t.numel() * t.element_size() for _, t in items.stable)
    snap.capture_items(items.stable, items.volatile, items.values, 1, live=True)
    snap.capture_items(items.stable, items.volatile, items.values, 2)  # a checkpoint step: a copy
    snap.wait()
    assert not snap.live and snap.nbytes >= size
    which = snap.pin()
    state.optimizer.zero_grad()
    forward_backward(state, 7, 1)
    state.optimizer.step()
    assert snap.held_step() == 2  # a copy: the optimizer does not touch it
    snap.capture_items(items.stable, items.volatile, items.values, 3, live=True)
    assert snap.nbytes >= size  # the save still writes from the copy
    snap.unpin(which)
    assert snap.nbytes < size


def decay(state: TrainState, how: str) -> None:
    """What a loop may do at the top of a step, before its optimizer.step(): decay the weights in
    place (last parameters first: the ones a background copy would reach last)."""
    for p in reversed(list(state.model.parameters())):
        if how == "data":
            p.data.mul_(0.5)
        else:
            with torch.no_grad():
                p.mul_(0.5)


@pytest.mark.parametrize("how", ["no_grad", "data"])
def test_a_copied_snapshot_holds_its_step_whatever_the_next_step_changes_before_its_optimizer_step(how):
    """A copied snapshot (checkpoints; --copy-snapshots) of a state of 24 MB (once copied in the
    background while the next step ran) is complete when the commit returns: an in-place change
    at the top of the next step, through no_grad or .data, does not leak into it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    state = TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    plan = CapturePlan(state)
    snap = Snapshot()
    for step in range(4):
        state.optimizer.zero_grad()
        model(torch.randn(8, 1024, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        state.optimizer.step()
        state.step += 1
        expected = synchronous(state)
        items = plan.items()
        if step == 0:
            assert sum(t.numel() * t.element_size() for _, t in items.stable) >= 24 << 20
        snap.capture_items(items.stable, items.volatile, items.values, state.step)
        decay(state, how)  # the next step begins
        snap.wait()  # what a checkpoint writer waits for before it reads
        assert snap.held_step() == state.step
        got = dict(tree.tensor_leaves(split_state(snap.checkpoint_state())[0]))
        wrong = [p for p, t in expected[0].items() if not torch.equal(got[p], t)]
        assert not wrong, f"step {state.step}: the snapshot holds part of the next step in {wrong}"


class DataSGD(torch.optim.Optimizer):
    """Plain SGD that updates p.data, as some third-party optimizers do: no version counter moves."""

    def __init__(self, params, lr: float = 0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


def unseen_change(state: TrainState, how: str) -> None:
    """Change the last parameter in place without moving its version counter."""
    p = list(state.model.parameters())[-1]
    if how == "data":
        p.data.mul_(0.5)
    else:
        p.detach().numpy()[...] *= 0.5


@pytest.mark.parametrize("how", ["data", "numpy"])
def test_a_live_tensor_changed_behind_its_version_counter_is_loud_and_never_used(how, caplog):
    """A change through .data or a numpy view after the commit leaves every version counter where it
    was: the sampled checksum sees it. The snapshot holds no step (a failure falls back to a peer or
    a checkpoint), reading it raises, one error line says why, and later captures are copies."""
    state = make_state(False)
    plan = CapturePlan(state)
    snap = Snapshot()
    forward_backward(state, 0, 1)
    state.optimizer.step()
    state.step += 1
    expected = synchronous(state)
    items = plan.items()
    snap.capture_items(items.stable, items.volatile, items.values, state.step, live=True)
    assert snap.live and snap.held_step() == 1
    unseen_change(state, how)
    with caplog.at_level("ERROR", logger="elastic._internal.worker.snapshot"):
        assert snap.held_step() == -1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "model.3.bias" in errors[0] and "version counter" in errors[0], errors
    assert snap.violation is not None
    with pytest.raises(RuntimeError, match="no longer holds"):
        snap.state_dict()
    state.step += 1
    snap.capture_items(items.stable, items.volatile, items.values, state.step, live=True)
    assert not snap.live and snap.held_step() == 2  # a copy from now on
    assert not all(torch.equal(t, expected[0][p]) for p, t in snap.tensors if p in expected[0])


def test_an_optimizer_that_updates_p_data_is_caught_at_the_next_commit_and_gets_copies(caplog):
    """Its step moves no version counter, so a live snapshot would go on claiming the last commit
    after an optimizer.step() that was never committed. At the next commit the parameters' samples
    moved while their versions did not: that commit and every later one are copies, which hold
    their step through the next optimizer.step()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    state = TrainState(model=model, optimizer=DataSGD(model.parameters()))
    plan = CapturePlan(state)
    snap = Snapshot()
    with caplog.at_level("ERROR", logger="elastic._internal.worker.snapshot"):
        for step in range(3):
            state.optimizer.zero_grad()
            model(torch.randn(12, 16)).square().mean().backward()
            state.optimizer.step()
            state.step += 1
            items = plan.items()
            snap.capture_items(items.stable, items.volatile, items.values, state.step, live=True)
    assert [snap.live, snap.violation is not None] == [False, True]
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1
    expected = synchronous(state)
    state.optimizer.zero_grad()
    model(torch.randn(12, 16)).square().mean().backward()
    state.optimizer.step()  # never committed: the snapshot still holds step 3, exactly
    assert snap.held_step() == 3
    got = dict(tree.tensor_leaves(split_state(snap.state_dict())[0]))
    assert all(torch.equal(got[p], t) for p, t in expected[0].items())

