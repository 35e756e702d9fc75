"""The worker-side API: what a training function calls.

    ctx = elastic.get_context()
    ctx.restore(state)              # newest committed state: a peer's memory first, storage second
    ddp = ctx.prepare_model(model)  # DDP over this generation's training group
    ctx.commit(state, metrics)      # ends a step: step += 1, snapshot, vote, checkpoint when due

commit() is also where membership changes take effect: every rank votes in one tiny allreduce, so
all ranks agree on the step at which to pause for a resize or a preemption.

WorkerContext is a facade: the work happens in the generation it fronts (generation.py), which it
sees only through `GenerationView`.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from elastic.errors import ConfigError
from elastic.train_state import TrainState

# The context of the training function running in this process; a thread that runs a rank of its
# own (several ranks in one test process) sees its own.
_process: "WorkerContext | None" = None
_local = threading.local()


def get_context() -> "WorkerContext":
    ctx = getattr(_local, "ctx", None) or _process
    if ctx is None:
        raise RuntimeError(
            "elastic.get_context() is only available inside a training function run by "
            "elastic.ElasticTrainer or `elastic run`"
        )
    return ctx


def set_context(ctx: "WorkerContext | None") -> None:
    global _process
    _local.ctx = ctx
    _process = ctx


class GenerationView(Protocol):
    """What a WorkerContext needs of the generation it fronts (generation.Generation is one)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def local_rank(self) -> int: ...

    @property
    def local_world_size(self) -> int: ...

    @property
    def number(self) -> int:
        """The generation's number."""

    @property
    def device(self) -> torch.device: ...

    @property
    def process_group(self) -> Any: ...

    @property
    def restored_state(self) -> TrainState | None:
        """The state given to restore() in this generation, None before."""

    def restore(self, state: TrainState) -> bool: ...

    def skip_init_if_restoring(self) -> AbstractContextManager[bool]: ...

    def prepare_model(self, model: torch.nn.Module, strategy: str = "ddp", shard_modules: Any = None,
                      **ddp_kwargs: Any) -> torch.nn.Module: ...

    def commit(self, state: TrainState, metrics: dict[str, float] | None = None, *, reduce: bool = False) -> None: ...

    def report(self, metrics: dict[str, float]) -> None: ...

    def stats(self) -> dict[str, float]: ...


class WorkerContext:
    def __init__(self, generation: GenerationView):
        self._gen = generation
        self.rank: int = generation.rank
        self.world_size: int = generation.world_size
        self.local_rank: int = generation.local_rank
        self.local_world_size: int = generation.local_world_size
        self.generation: int = generation.number
        self.device: torch.device = generation.device

    def __repr__(self) -> str:
        return (f"WorkerContext(rank={self.rank}, world_size={self.world_size}, "
                f"generation={self.generation}, device={self.device})")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def process_group(self) -> Any:
        """This generation's training group (the default group in a worker process)."""
        return self._gen.process_group

    def restore(self, state: TrainState) -> bool:
        """Load the newest committed state into `state`; False on a fresh run (nothing to load).

        Sources, freshest first: this rank's own snapshot, a surviving peer's snapshot, the newest
        durable checkpoint that verifies.
        """
        return self._gen.restore(state)

    def skip_init_if_restoring(self) -> AbstractContextManager[bool]:
        """Build the model inside this block to skip drawing initial weights that restore() would
        overwrite: `with ctx.skip_init_if_restoring(): model = build_model()`.

        When this generation's restore() will load a state (from a peer's memory or a checkpoint;
        the ranks agree in one small collective, so every rank must enter the block at the same
        point), `torch.nn.init`'s functions do nothing on this thread inside it: parameters are
        allocated, not initialised (recovery saves the init's time, ≈ 1 s at 25 M parameters on one
        core). A fresh start (the first generation) runs the block exactly as without it. Only what
        restore() loads is overwritten: tensors outside the state dict must not come from
        torch.nn.init (buffers computed with plain torch ops, as rotary tables are, are fine).
        Yields whether it skips."""
        return self._gen.skip_init_if_restoring()

    def prepare_model(self, model: torch.nn.Module, strategy: str = "ddp", shard_modules: Any = None,
                      **ddp_kwargs: Any) -> torch.nn.Module:
        """Move `model` to this rank's device and make it data parallel over the current group.

        strategy="ddp" (default): returns a DDP-style wrapper (ExactDDP) to call for forward.
        strategy="fsdp": shards the model in place with FSDP2 (`fully_shard` on each of
        `shard_modules`, modules or module types, default the model's blocks, then the root) and
        returns it. Build the optimizer after this, then call restore(state).
        strategy="hsdp": the same on a two-dimensional mesh, dimension 0 ("replicate") across the
        Ray nodes and dimension 1 ("shard") over the ranks within a node, when there are two or more
        nodes holding the same number of ranks; otherwise (one node, or uneven nodes after a loss)
        one FSDP dimension over every rank, logged once. A lost rank's rows come back from its live
        replica on another node (no buddy copy, no storage read).
        """
        return self._gen.prepare_model(model, strategy=strategy, shard_modules=shard_modules, **ddp_kwargs)

    def commit(self, state: TrainState, metrics: dict[str, float] | None = None, *, reduce: bool = False) -> None:
        """End a step: step += 1; remember the state; checkpoint when due; apply agreed pauses.

        `metrics` (numbers): rank 0's reach the driver for every step (callbacks, URI/metrics.jsonl,
        progress). reduce=True: each key's mean over all ranks instead (one extra collective: use it
        when ranks see different data, e.g. for a loss averaged over the whole global batch)."""
        self._gen.commit(state, metrics, reduce=reduce)

    def report(self, metrics: dict[str, float]) -> None:
        """Publish metrics without ending a step (e.g. a final evaluation)."""
        self._gen.report(metrics)

    def data_loader(self, dataset: Any, *, global_batch_size: int, state: TrainState | None = None,
                    seed: int = 0, steps: int | None = None, drop_last: bool = True, **kw: Any) -> Any:
        """A torch DataLoader over `dataset` (map-style) yielding this rank's share of each step's
        global batch, from `state.step` (default: the state given to restore()) up to `steps`
        (forever when None). Other DataLoader arguments (num_workers, pin_memory, prefetch_factor,
        collate_fn, persistent_workers, ...) pass through. Build it after restore(), in the
        training function: a new generation builds a new one at the step it restored.
        `loader.batch_sampler.loss_scale()` is ElasticSampler.loss_scale at this world size."""
        from elastic._internal.worker.loader import make_loader

        state = state if state is not None else self._gen.restored_state
        if state is None:
            raise ConfigError("data_loader needs the step to start at: call ctx.restore(state) first, or pass state=")
        return make_loader(dataset, global_batch_size=global_batch_size, start_step=state.step, rank=self.rank,
                           world_size=self.world_size, seed=seed, steps=steps, drop_last=drop_last, **kw)

    def stats(self) -> dict[str, float]:
        """What elastic costs this rank so far: host memory of its snapshot, seconds the training
        thread spent on snapshots (copying what cannot wait, waiting for what had not finished),
        the background copies' own seconds, and the last checkpoint's foreground stall."""
        return self._gen.stats()
