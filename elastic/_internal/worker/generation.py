"""One generation on one rank: what the training function's calls mean, on this generation's process
groups. A Generation composes pieces that each do one job:

- ModelPrep (model_prep.py): ctx.prepare_model, ExactDDP or FSDP2; whether the state is sharded.
- Snapshotter (snapshotter.py): this rank's snapshot of a committed step, and its buddy copy.
- Restorer (restorer.py): ctx.restore, from a snapshot, a peer, the group's rows, or storage.
- Committer (committer.py): ctx.commit; it asks PauseVote (vote.py) whether to leave the group.
- Saver (saver.py): checkpoints from the snapshot, and the final save of the newest state.

What outlives a generation in the process is Services (services.py), given explicitly, so several
ranks can run in one test process. The user sees none of this: WorkerContext (context.py) fronts a
Generation through the small interface it declares (context.GenerationView).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from elastic.train_state import TrainState
from elastic._internal.worker import init_skip
from elastic._internal.worker.committer import Committer
from elastic._internal.worker.groups import ProcessGroups
from elastic._internal.worker.model_prep import ModelPrep
from elastic._internal.worker.restorer import Restorer
from elastic._internal.worker.saver import Saver
from elastic._internal.worker.services import Services
from elastic._internal.worker.snapshotter import Snapshotter
from elastic._internal.worker.vote import PauseVote


BUDDY_GRACE_S = 0.2
"""How long a rank leaving a broken generation waits for its buddy exchange in flight before it
leaves it behind (BuddyCopies.abandon): far below the supervisor's poll timeout, after which a rank
still in the old group is declared stuck."""


class Generation:
    def __init__(self, groups: ProcessGroups, device: torch.device, services: Services, *,
                 local_rank: int = 0, local_world_size: int = 1, node_id: str = ""):
        self.groups = groups
        self.device = device
        self.s = services
        self.local_rank = local_rank
        self.local_world_size = local_world_size
        self._model = ModelPrep(groups, device, services.clock, node_id=node_id or "?", kept=services.kept_model)
        self._snapshots = Snapshotter(groups, services, self._model)
        self._vote = PauseVote(groups)
        self._saver = Saver(groups, services, self._model)
        self._restorer = Restorer(groups, services, self._model, self._snapshots)
        self._committer = Committer(groups, services, self._model, self._snapshots, self._vote, self._saver)
        self.init_skipped_calls = 0
        """How many torch.nn.init calls skip_init_if_restoring skipped (tests read it)."""

    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    @property
    def number(self) -> int:
        """This generation's number (0 for the run's first group)."""
        return self.groups.generation

    @property
    def process_group(self) -> Any:
        """This generation's training group."""
        return self.groups.train

    @property
    def restored_state(self) -> TrainState | None:
        """The state given to restore() in this generation (where data_loader() starts)."""
        return self._restorer.restored_state

    # -- what the training function calls (through WorkerContext) ------------------------------
    def restore(self, state: TrainState) -> bool:
        return self._restorer.restore(state)

    @contextlib.contextmanager
    def skip_init_if_restoring(self) -> Iterator[bool]:
        """Within the block, torch.nn.init does nothing on this thread when restore() will load a
        state (agreed by every rank: a collective); yields whether it skips (init_skip.py)."""
        if not self._restorer.will_load():
            yield False
            return
        with init_skip.skipping() as skipped:
            self._restorer.init_skipped = True
            yield True
        self.init_skipped_calls = skipped.calls

    def prepare_model(self, model: torch.nn.Module, strategy: str = "ddp", shard_modules: Any = None,
                      **ddp_kwargs: Any) -> torch.nn.Module:
        return self._model.prepare(model, strategy=strategy, shard_modules=shard_modules,
                                   will_load=self._restorer.will_load, **ddp_kwargs)

    def commit(self, state: TrainState, metrics: dict[str, float] | None = None, *, reduce: bool = False) -> None:
        self._committer.commit(state, metrics, reduce=reduce)

    def report(self, metrics: dict[str, float]) -> None:
        """Publish metrics without ending a step (e.g. a final evaluation)."""
        self.s.board.progress(self.s.board.get().step, metrics, merge=True)

    def stats(self) -> dict[str, float]:
        """What elastic costs this rank so far (WorkerContext.stats)."""
        s = self.s
        shard = sum(t.numel() * t.element_size() for p, t in s.snapshot.tensors if p in s.snapshot.shards)
        return {"snapshot_bytes": float(s.snapshot.nbytes), "snapshot_blocked_s": s.snapshot.blocked_s,
                "snapshot_copy_s": s.snapshot.copy_s, "checkpoint_stall_s": s.checkpointer.last_stall_s or 0.0,
                "buddy_bytes": float(s.buddy.nbytes), "shard_bytes": float(shard),
                "restore_host_bytes": float(self._restorer.host_bytes),
                "restore_mapped_bytes": float(self._restorer.mapped_bytes),
                "model_kept": float(self._model.reused)}

    # -- what the runtime calls ---------------------------------------------------------------
    def drain_vote(self) -> None:
        """Complete the vote in flight before anything else uses (or destroys) the group."""
        self._vote.drain()

    def finish(self) -> None:
        """The function returned: the newest committed state must be durable before we report."""
        self.drain_vote()
        self.save_newest()

    def save_newest(self) -> None:
        """Make the newest state any rank holds durable (the run is ending, finished or not)."""
        self._saver.save_newest()

    def release(self, *, broken: bool = False, keep: bool = False) -> None:
        """`keep`: the next generation may train this one's sharded model (kept_model.py)."""
        # The wrapper holds the process group: drop it before the group is destroyed. A copy still
        # in flight completes (its sources no longer change) before anyone reads the snapshot.
        self._model.release(keep=keep)
        self._vote.forget()
        self._snapshots.release()
        self.s.snapshot.wait()
        if broken:  # a buddy exchange in flight cannot succeed now, and may never end by itself
            self.s.buddy.abandon(BUDDY_GRACE_S)
        self.s.buddy.wait(self.groups.timeout_s + 5)
