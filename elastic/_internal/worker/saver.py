"""Writing checkpoints from what this rank holds: a periodic or leaving save from its snapshot, and
the final save of the newest state any rank holds (the run is ending, finished or not).

Saves are collective, on the control plane, and commit through the process's Checkpointer; each
commit or failure is reported as an event.
"""

from __future__ import annotations

from typing import Any

from elastic.errors import CheckpointFailedError
from elastic._internal.events import Event
from elastic._internal.worker.groups import ProcessGroups
from elastic._internal.worker.model_prep import ModelPrep
from elastic._internal.worker.recovery import peer_sync, sharded_state
from elastic._internal.worker.services import Services

LEAVE_SAVE_COLLECTIVES = 4
"""A save before leaving (preemption, stop) waits at most this many collective timeouts to commit."""


class Saver:
    """One generation's checkpoint writes."""

    def __init__(self, groups: ProcessGroups, services: Services, model: ModelPrep):
        self.groups = groups
        self.s = services
        self.model = model

    def save_from_snapshot(self, step: int, *, wait: bool, must_commit: bool = False) -> bool:
        """Checkpoint the snapshot of `step` (collective), writing straight from its buffers: they
        stay pinned until the save ends, and the writer waits for a copy still in flight. With
        `wait`, block until it commits and say whether it did. `must_commit`: the run's newest state
        depends on it (the final save): CheckpointFailedError if it did not commit."""
        snap = self.s.snapshot
        which = snap.pin()
        ck = self.s.checkpointer
        ck.save(snap.checkpoint_state(), step=step, rank=self.groups.rank, world_size=self.groups.world_size,
                pg=self.groups.ctrl, store=self.groups.ckpt_store, on_commit=self._on_commit,
                on_failure=self._on_failure, staged=True, ready=snap.waiter(), on_done=lambda: snap.unpin(which))
        if not wait:
            return True
        return self._wait_committed(step, must_commit=must_commit)

    def save_newest(self) -> None:
        """Make the newest state any rank holds durable (the run is ending, finished or not).

        Every decision here comes from values all ranks agreed on, so all take the same branch.
        """
        s, ctrl = self.s, self.groups.ctrl
        s.checkpointer.settle(ctrl, self.groups.world_size)
        if self.model.sharded or s.snapshot.shards:
            self._save_newest_sharded()
            return
        agreed = peer_sync.agree(s.snapshot.held_step(), s.latest_durable_step(), ctrl)
        if agreed.best <= agreed.durable:
            return
        peer_sync.newest_state(s.snapshot, agreed, ctrl)  # every rank now holds the newest snapshot
        self.save_from_snapshot(agreed.best, wait=True, must_commit=True)

    def _save_newest_sharded(self) -> None:
        """save_newest for a sharded state: each chunk written by one of its holders."""
        s, groups = self.s, self.groups
        s.snapshot.wait()
        s.buddy.wait()
        found, durable, _ = sharded_state.agree(groups, s, s.latest_durable_step(), -1)
        if found is None or found.step <= durable:
            return
        s.checkpointer.save(sharded_state.checkpoint_state(groups, s, found), step=found.step, rank=groups.rank,
                            world_size=groups.world_size, pg=groups.ctrl, store=groups.ckpt_store,
                            on_commit=self._on_commit, on_failure=self._on_failure, staged=True)
        self._wait_committed(found.step, must_commit=True)

    def _wait_committed(self, step: int, *, must_commit: bool) -> bool:
        ck = self.s.checkpointer
        # A final save may take the whole commit timeout; a preemption or a stop has a grace period
        # to fit in, so it gives up sooner (the newest state stays in the survivors' memory).
        timeout = ck.commit_timeout_s if must_commit else LEAVE_SAVE_COLLECTIVES * self.s.run.failure.collective_timeout_s
        if ck.wait(timeout_s=timeout) is not None:
            return True
        reason = ck.last_error or f"not committed within {timeout:g}s"
        if ck.last_error is None:
            self._on_failure(step, reason)  # still in flight: say so now (a failure says so itself)
        if must_commit:
            raise CheckpointFailedError(f"the checkpoint of step {step} was not committed ({reason}); the "
                                        "newest committed checkpoint is older: see `elastic ls URI`")
        return False

    def _on_commit(self, info: Any) -> None:
        self.s.board.committed(info.step)
        self.s.board.emit(Event.CHECKPOINT_COMMITTED, step=info.step,
                          seconds=round(getattr(info, "seconds", 0.0) or 0.0, 4), bytes=info.bytes,
                          world_size=info.world_size, uri=info.uri)

    def _on_failure(self, step: int, reason: str) -> None:
        self.s.board.emit(Event.CHECKPOINT_FAILED, step=step, reason=reason)
