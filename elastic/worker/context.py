"""The worker-side API: what a training function calls.

    ctx = elastic.get_context()
    ctx.restore(state)              # newest committed state: a peer's memory first, storage second
    ddp = ctx.prepare_model(model)  # DDP over this generation's process group
    ctx.commit(state, metrics)      # ends a step: step += 1, snapshot, vote, checkpoint when due

commit() is also where membership changes take effect: every rank votes in one tiny allreduce, so
all ranks agree on the step at which to pause for a resize or a preemption.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from elastic.errors import WorkerGroupError
from elastic.train_state import TrainState
from elastic.worker import grad_sync, peer_sync
from elastic.worker.seeding import reseed

if TYPE_CHECKING:
    from elastic.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)

_current: "WorkerContext | None" = None


class PauseRequested(WorkerGroupError):
    """Unwinds the training function at a step boundary that every rank agreed on."""


def get_context() -> "WorkerContext":
    if _current is None:
        raise RuntimeError(
            "elastic.get_context() is only available inside a training function run by "
            "elastic.ElasticTrainer or `elastic run`"
        )
    return _current


def _set_current(ctx: "WorkerContext | None") -> None:
    global _current
    _current = ctx


class WorkerContext:
    def __init__(self, runtime: "WorkerRuntime", *, rank: int, world_size: int, local_rank: int,
                 generation: int, device: torch.device, pg: dist.ProcessGroup):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.generation = generation
        self.device = device
        self.process_group = pg
        self._rt = runtime
        self._ddp: DistributedDataParallel | None = None
        self._pending_vote: tuple[Any, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (f"WorkerContext(rank={self.rank}, world_size={self.world_size}, "
                f"generation={self.generation}, device={self.device})")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- restore ---------------------------------------------------------------------------
    def restore(self, state: TrainState) -> bool:
        """Load the newest committed state into `state`; False on a fresh run (nothing to load).

        Sources, freshest first: this rank's own snapshot, a surviving peer's snapshot (sent over
        the group), the newest durable checkpoint that verifies.
        """
        rt = self._rt
        with rt.collective():
            agreed = peer_sync.agree(rt.snapshot.step, rt.latest_durable_step(), self.process_group,
                                     self._comm_device, last_committed=rt.step)
        durable = agreed.durable
        source = "fresh"
        if agreed.peers_are_freshest:
            with rt.collective():
                sd, source = peer_sync.newest_state(rt.snapshot, agreed, self.process_group, self._comm_device)
            state.load_state_dict(sd)
        elif durable >= 0:
            template = state.state_dict()
            info = rt.checkpointer.load(template, step=durable, fallback=True)
            if info is None:
                raise WorkerGroupError(f"checkpoint at step {durable} vanished while loading")
            state.load_state_dict(template)
            source = f"checkpoint:{info.step}"
        if source != "fresh":
            rt.snapshot.capture(state.state_dict(), state.step)
        rt.on_restored(state, source, lost_steps=max(0, agreed.last_committed - state.step))
        reseed(rt.seed, state.step, self.rank)
        return source != "fresh"

    # -- model -----------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module, **ddp_kwargs: Any) -> DistributedDataParallel:
        """Move `model` to this rank's device and wrap it in DDP over the current group.

        Gradients are reduced per parameter (see grad_sync) so that results do not depend on when
        the wrapper was built.
        """
        model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids, process_group=self.process_group, **ddp_kwargs)
        ddp.register_comm_hook(None, grad_sync.make_hook(self.process_group, self._rt.clock))
        self._ddp = ddp
        return ddp

    # -- commit ----------------------------------------------------------------------------
    def commit(self, state: TrainState, metrics: dict[str, float] | None = None) -> None:
        """End a step: step += 1; remember the state; checkpoint when due; apply agreed pauses."""
        rt = self._rt
        state.step += 1
        pause, preempt = self._vote(rt.pause_requested, rt.preempt_requested)
        # Leaving the group (pause, preemption) always snapshots: the next group restores from it.
        snapshot = preempt or pause or state.step % rt.run.failure.snapshot_every_n_steps == 0
        save = rt.checkpoint_due(state.step) or preempt
        if snapshot or save:
            sd = state.state_dict()
            if snapshot:
                rt.snapshot.capture(sd, state.step)
            if save:
                rt.save_checkpoint(sd, state.step, self, wait=preempt)
        rt.on_step(state.step, metrics)
        reseed(rt.seed, state.step, self.rank)
        if preempt or pause:
            self._drain_vote()  # every rank launched it at this same boundary
        if preempt:
            raise PauseRequested("preemption notice: checkpoint committed, leaving the group")
        if pause:
            raise PauseRequested("membership change at a step boundary")

    def _vote(self, pause: bool, preempt: bool) -> tuple[bool, bool]:
        """Agree on pausing: returns the vote launched at the previous commit and launches this
        one asynchronously, so the tiny allreduce overlaps the next step instead of stalling this
        one. Every rank acts on the same reduced values at the same step boundary."""
        rt = self._rt
        agreed = (False, False)
        if self._pending_vote is not None:
            work, buf = self._pending_vote
            with rt.collective():
                work.wait()
            agreed = (bool(buf[0]), bool(buf[1]))
        buf = torch.tensor([int(pause), int(preempt)], dtype=torch.int64, device=self._comm_device)
        work = dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.process_group, async_op=True)
        self._pending_vote = (work, buf)
        return agreed

    def _drain_vote(self) -> None:
        """Complete the vote in flight before anything else uses (or destroys) the group."""
        if self._pending_vote is not None:
            work, _ = self._pending_vote
            self._pending_vote = None
            with self._rt.collective():
                work.wait()

    def report(self, metrics: dict[str, float]) -> None:
        """Publish metrics without ending a step (e.g. a final evaluation)."""
        self._rt.on_step(self._rt.step, metrics, merge=True)

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _release(self) -> None:
        # The DDP wrapper holds the process group: drop it before the group is destroyed.
        self._ddp = None
        self._pending_vote = None
