"""Making the user's model data parallel over a generation's training group (ctx.prepare_model), and
remembering how: whether the state is sharded decides how the other pieces snapshot, restore and
save it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from elastic._internal.collectives import CollectiveClock
from elastic.errors import ConfigError
from elastic._internal.worker import fsdp, hsdp, kept_model, meshes
from elastic._internal.worker.ddp import ExactDDP
from elastic._internal.worker.groups import ProcessGroups
from elastic._internal.worker.recovery.reshard import Layout

STRATEGIES = ("ddp", "fsdp", "hsdp")


class ModelPrep:
    """One generation's model: wrapped in ExactDDP or sharded with FSDP2 (one mesh dimension or HSDP's two)."""

    def __init__(self, groups: ProcessGroups, device: torch.device, clock: CollectiveClock, *, node_id: str = "?",
                 kept: kept_model.Slot | None = None):
        self.groups = groups
        self._slot = kept if kept is not None else kept_model.Slot()
        self.device = device
        self._clock = clock
        self.node_id = node_id
        self._nodes: tuple[str, ...] | None = None
        self.sharded = False
        """The model was sharded with FSDP2 (strategy "fsdp" or "hsdp"): snapshots of rows, resharding."""
        self.layout = Layout.flat(groups.world_size)
        """Which rows of each sharded tensor each rank holds (HSDP: by its column of the mesh)."""
        self.replicated = False
        """HSDP on two or more nodes: every rank's rows are also held by a replica (no buddy copies)."""
        self._ddp: ExactDDP | None = None
        self._kept: kept_model.KeptModel | None = None
        """This generation's sharded model, as the next generation may keep it (kept_model.py)."""
        self.reused = False
        """prepare returned the model this rank kept from the last generation."""
        self.previous_optimizer: torch.optim.Optimizer | None = None
        """The kept model's optimizer, whose state the restore may hand to the new one."""
        self.optimizer: torch.optim.Optimizer | None = None
        """The optimizer this generation restored with (kept with the model)."""

    def nodes(self) -> tuple[str, ...]:
        """Every rank's node, in rank order: gathered once per generation on the control plane, at
        the first call (a collective: every rank makes it at the same point)."""
        if self._nodes is None:
            self._nodes = tuple(self.groups.ctrl.all_gather_json(self.node_id))
        return self._nodes

    def prepare(self, model: torch.nn.Module, strategy: str = "ddp", shard_modules: Any = None, *,
                will_load: Callable[[], bool] = lambda: False, **ddp_kwargs: Any) -> torch.nn.Module:
        """Move `model` to this rank's device and make it data parallel over the training group:
        "ddp": wrapped in ExactDDP (ddp.py), whose bucket layout is a pure function of the model;
        "fsdp": sharded in place with FSDP2 (fsdp.py), per block then the root;
        "hsdp": the same on a (node, rank within node) mesh (hsdp.py) when the nodes are even; the
        model this rank kept from the last generation instead, when the restore will load a state
        into it (`will_load`: agreed by every rank, a collective)."""
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
        if strategy in ("fsdp", "hsdp"):
            model = self._shard_or_reuse(model, strategy, shard_modules, will_load)
            self.sharded = True
            if self.groups.world_size > 1 and not self.replicated:
                self.groups.open_transfer_plane()  # for the buddy copies
            return model
        model.to(self.device)
        self._ddp = ExactDDP(model, process_group=self.groups.train, clock=self._clock, **ddp_kwargs)
        return self._ddp

    def _shard_or_reuse(self, model: torch.nn.Module, strategy: str, shard_modules: Any,
                        will_load: Callable[[], bool]) -> torch.nn.Module:
        """The model this rank kept from the last generation when it fits this one (kept_model.py)
        and a state will be loaded into it (never the weights of steps nobody committed), else
        `model`, sharded; the first sharded model of a generation is the one kept."""
        mesh = self._mesh(strategy)
        blocks = fsdp.blocks(model, shard_modules)
        names = {id(m): n for n, m in model.named_modules()}
        place = (strategy, tuple(names.get(id(b), "?") for b in blocks), kept_model.mesh_place(mesh),
                 self.layout, self.replicated)
        built = kept_model.structure(model)
        if self._kept is not None:  # a second model in this generation: sharded, not kept
            return fsdp.shard(model, mesh, self.device, blocks)
        previous = self._slot.take()  # not reused, it is freed before the new model is sharded
        reused = kept_model.reuse(previous, model, mesh, place, built) if will_load() else None
        if reused is not None and previous is not None:
            self._kept, self.reused, self.previous_optimizer = previous, True, previous.optimizer
            previous.optimizer = None
            return reused
        del previous
        fsdp.shard(model, mesh, self.device, blocks)
        self._kept = kept_model.record(model, mesh, place, built)
        return model

    def _mesh(self, strategy: str) -> Any:
        """The DeviceMesh to shard on (this thread's object for it: meshes.py); sets `layout` and
        `replicated`."""
        return meshes.canonical(self._new_mesh(strategy))

    def _new_mesh(self, strategy: str) -> Any:
        g = self.groups
        if strategy == "hsdp" and g.world_size > 1 and g.is_default:  # the mesh's groups come from new_group
            plan = hsdp.plan_mesh(self.nodes())
            hsdp.say_fallback(plan)
            if plan.hsdp:
                self.layout, self.replicated = plan.layout, True
                return hsdp.build_mesh(plan, g.rank, self.device, g.timeout_s, g.gloo_sockets)
        return fsdp.flat_mesh(g.train, self.device)

    def forget_kept(self) -> None:
        """This generation's model is not to be kept (the next one builds its own)."""
        self._kept = None

    def release(self, *, keep: bool = False) -> None:
        """The wrapper holds the process group: drop it before the group is destroyed. `keep`: the
        generation was broken or paused, not failed by its own code: its sharded model may serve the
        next one."""
        if keep and self._kept is not None:
            self._kept.optimizer = self.optimizer
            self._slot.put(self._kept)
        elif not keep:  # failed or finished: nothing of it is trained on again
            self._slot.put(None)
        self._kept = self.previous_optimizer = self.optimizer = None
        if self._ddp is not None:
            self._ddp.remove_hooks()
        self._ddp = None
