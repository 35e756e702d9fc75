"""What a commit copies, found once: the tensors of a TrainState's state dict, kept as references to
the live tensors, and a cheap way to read its other values again.

`TrainState.state_dict()` goes through torch's get_state_dict, which re-derives every parameter's
name and walks the optimizer each call (about 10 ms for 200 tensors here): too slow for every step.
A plan calls it once, remembers which live tensor each entry aliases, and at each commit checks that
none was replaced (cheap identity checks) and reads the few non-tensor values (learning rates, the
step, a scheduler's state) directly. When anything changed shape or identity, it binds again.

Tensors are sorted into two kinds:
- stable: parameters and optimizer state. They change only in optimizer.step(), so they can be
  copied while the next step's forward and backward run (the snapshot makes optimizer.step() wait).
- volatile: everything else (BatchNorm's running statistics, which forward updates; tensors in
  `extra`): small, copied at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from elastic._internal import tree
from elastic._internal.checkpoint.state import split_state
from elastic.train_state import TrainState, is_stateful
from elastic._internal.tree import Path
from elastic._internal.worker.fsdp import is_sharded, local_chunk


@dataclass
class Items:
    """One commit's worth of state: tensors to copy (live references) and values (JSON)."""

    stable: list[tuple[Path, torch.Tensor]]
    volatile: list[tuple[Path, torch.Tensor]]
    values: list[tuple[Path, Any]]
    shards: dict[Path, tuple[tuple[int, ...], tuple[int, ...]]]
    """For a sharded tensor (FSDP2): (its whole shape, the offsets of this rank's rows)."""


class CapturePlan:
    def __init__(self, state: TrainState):
        self.state = state
        self.binds = 0
        """How often the state dict was walked in full (tests check it stays at 1)."""
        self._bind()

    # -- binding (the slow path, once) ----------------------------------------------------------
    def _bind(self) -> None:
        st = self.state
        self.binds += 1
        sd = st.state_dict()
        tensors, values = split_state(sd)
        self._optim_entries = sum(map(len, st.optimizer.state.values())) if st.optimizer is not None else 0
        self._bind_tensors(tree.tensor_leaves(tensors))
        self.on_cpu = all(t.device.type == "cpu" for _, t in self._stable)
        """Every stable tensor is in host memory (where a live snapshot saves a copy per step)."""
        self._bind_values(values)

    def _bind_tensors(self, leaves: list[tuple[Path, torch.Tensor]]) -> None:
        """Sort the state dict's tensors: parameters and optimizer state are stable (each with the
        identity check that tells when it was replaced), the rest volatile; note sharded ones."""
        st = self.state
        params = {id(p) for p in st.model.parameters()}
        by_storage = {_local(p).data_ptr(): p for p in st.model.parameters()}
        self._shards: dict[Path, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        opt_slots: dict[int, tuple[dict, str]] = {}
        if st.optimizer is not None:
            for pstate in st.optimizer.state.values():
                for k, v in pstate.items():
                    if isinstance(v, torch.Tensor):
                        opt_slots[id(v)] = (pstate, k)
        self._stable: list[tuple[Path, torch.Tensor]] = []
        self._volatile_paths: list[Path] = []
        self._volatile: list[tuple[Path, torch.Tensor]] = []
        self._checks: list[tuple[Any, Any, torch.Tensor]] = []  # (owner, key-or-param, cached tensor)
        for path, t in leaves:
            head = path[0]
            src = t
            if is_sharded(t):  # FSDP2: this rank's rows, and where they sit in the whole tensor
                src, offsets, shape = local_chunk(t)
                self._shards[path] = (shape, offsets)
            if head == "optim" and id(t) in opt_slots:
                owner, key = opt_slots[id(t)]
                self._stable.append((path, src))
                self._checks.append((owner, key, t))
            elif head == "model" and src.data_ptr() in by_storage and id(by_storage[src.data_ptr()]) in params:
                p = by_storage[src.data_ptr()]
                self._stable.append((path, src))
                self._checks.append((None, p, src))
            elif head == "extra":
                self._volatile_paths.append(path)  # re-read from `extra` at every commit
            else:
                self._volatile.append((path, src))

    def _bind_values(self, values: list[tuple[Path, Any]]) -> None:
        """Values: the optimizer's, kept in torch's own numbering, mapped to names once."""
        self._model_values = [(p, v) for p, v in values if p[0] == "model"]
        groups = next((v for p, v in values if p == ("optim", "param_groups")), None)
        self._group_params = [g["params"] for g in groups] if groups else []
        self._fqn_of_index = [fqn for names in self._group_params for fqn in names]
        self._optim_value_paths = {p for p, _ in values if p[0] == "optim" and p != ("optim", "param_groups")}
        self._last_groups: list[dict] | None = None
        self._group_values: list[tuple[Path, Any]] = []
        self._fast_values = self._check_fast_values(values)

    @property
    def fast(self) -> bool:
        """Values are read directly (not by walking the state dict at every commit)."""
        return self._fast_values

    def _check_fast_values(self, values: list[tuple[Path, Any]]) -> bool:
        """The values read directly must be exactly what the full walk gives, or this plan walks in
        full at every commit (correct, slower)."""
        try:
            return self._values() == values
        except Exception:  # noqa: BLE001 - an optimizer whose state we do not understand
            return False

    # -- every commit ---------------------------------------------------------------------------
    def items(self) -> Items:
        if not self._valid():
            self._bind()
        if not self._fast_values:
            sd = self.state.state_dict()
            tensors, values = split_state(sd)
            leaves = {p: (local_chunk(t)[0] if is_sharded(t) else t) for p, t in tree.tensor_leaves(tensors)}
            return Items(stable=[(p, leaves[p]) for p, _ in self._stable],
                         volatile=[(p, leaves[p]) for p in self._volatile_paths] + self._volatile, values=values,
                         shards=self._shards)
        extra_tensors, values = self._extra()
        return Items(stable=self._stable, volatile=self._volatile + extra_tensors,
                     values=self._values(extra_values=values), shards=self._shards)

    def _valid(self) -> bool:
        st = self.state
        if st.optimizer is not None and sum(map(len, st.optimizer.state.values())) != self._optim_entries:
            return False  # state appeared or went away
        for owner, key, t in self._checks:
            if owner is None:
                local = _local(key)
                if local.data_ptr() != t.data_ptr() or local.shape != t.shape:
                    return False
            elif owner.get(key) is not t:
                return False
        return True

    def _extra(self) -> tuple[list[tuple[Path, torch.Tensor]], list[tuple[Path, Any]]]:
        if not self.state.extra:
            return [], [(("extra",), {})]  # an empty dict is a value of its own (it must round-trip)
        extra = {k: (v.state_dict() if is_stateful(v) else v) for k, v in self.state.extra.items()}
        tensors, values = split_state({"extra": extra})
        return tree.tensor_leaves(tensors), values

    def _values(self, extra_values: list[tuple[Path, Any]] | None = None) -> list[tuple[Path, Any]]:
        """The state's non-tensor values, in the order the full walk gives them."""
        st = self.state
        out: list[tuple[Path, Any]] = list(self._model_values)
        if st.optimizer is not None:
            if self._optim_value_paths:  # non-tensor optimizer state (most optimizers keep none)
                osd = st.optimizer.state_dict()  # torch's own: params numbered in group order
                for index, pstate in osd["state"].items():
                    for k, v in pstate.items():
                        if not isinstance(v, torch.Tensor):
                            path = ("optim", "state", self._fqn_of_index[index], k)
                            if path in self._optim_value_paths:
                                out.append((path, v))
            raw = [{k: v for k, v in g.items() if k != "params"} for g in st.optimizer.param_groups]
            if raw != self._last_groups:  # learning rates change, the rest rarely: convert on change
                groups = [{**g, "params": list(names)} for g, names in zip(raw, self._group_params)]
                self._group_values = split_state({"optim": {"param_groups": groups}})[1]
                self._last_groups = raw
            out += self._group_values
        out.append((("step",), int(st.step)))
        if extra_values is None:
            extra_values = self._extra()[1]
        out += extra_values
        return _in_walk_order(out)


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's own storage: its local rows when FSDP2 sharded it (a DTensor)."""
    return getattr(p, "_local_tensor", p)


def _in_walk_order(values: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
    """model..., optim..., step, extra... (the order of TrainState.state_dict()'s keys)."""
    rank = {"model": 0, "optim": 1, "step": 2, "extra": 3}
    return sorted(values, key=lambda pv: rank.get(pv[0][0], 4))
