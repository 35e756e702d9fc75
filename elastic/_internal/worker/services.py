"""What outlives process-group generations in a worker process: the snapshot, the checkpointer,
the status the supervisor polls, the buddy copies, a survivor's sharded model (kept_model.py), and
the pause and preemption flags.

A Generation (generation.py) is built on one Services per process, given explicitly, so several
ranks can run in one test process.
"""

from __future__ import annotations

import threading

from elastic._internal.checkpoint import Checkpointer, CheckpointStore
from elastic._internal.collectives import CollectiveClock
from elastic.config import RunConfig
from elastic.errors import ConfigError
from elastic._internal.lease import Lease
from elastic._internal.worker.kept_model import Slot
from elastic._internal.worker.recovery.buddy import BuddyCopies
from elastic._internal.worker.snapshot import Snapshot
from elastic._internal.worker.status import StatusBoard


class Services:
    """Per-process pieces that outlive process-group generations."""

    def __init__(self, run: RunConfig, *, board: StatusBoard | None = None, lease_token: int = 0):
        """`run.location` is where checkpoints go; `lease_token` (> 0) fences commits by the run's lease."""
        if run.location is None:
            raise ConfigError("a worker needs the run's location: set RunConfig.location or checkpoint.uri")
        self.run = run
        self.location = run.location
        self.seed = run.seed
        self.snapshot = Snapshot()
        self.clock = CollectiveClock()
        ck = run.checkpoint
        # Commits are fenced by the run's lease: a run that lost its location commits nothing.
        fence = (Lease(self.location), lease_token) if lease_token > 0 else None
        self.catalog = CheckpointStore(self.location)
        """The process's one store of the run's checkpoints (the checkpointer saves through it)."""
        self.checkpointer = Checkpointer(self.catalog, keep_last=ck.keep_last, async_save=ck.async_save,
                                         when_busy=ck.when_busy, commit_timeout_s=ck.commit_timeout_s, lease=fence)
        self.board = board or StatusBoard()
        self.buddy = BuddyCopies()
        self.kept_model = Slot()
        self.layout: dict | None = None
        """The running generation's optimizer over its sharded parameters, as a standby rehearses it
        (rehearsal.describe; None before a sharded restore)."""
        self.rehearsed = False
        """This process rehearsed a job's optimizer step while it was a standby (rehearsal.py)."""
        self.pause = threading.Event()
        """Leave the group at the next agreed step boundary (a resize)."""
        self.leave = threading.Event()
        """Commit a durable checkpoint at the next agreed boundary, then leave (a preemption notice,
        or the driver stopping the run)."""
        self.notice = threading.Event()
        """A preemption notice reached this worker (reported in polls: it is the one leaving)."""
        self.live_snapshots = run.failure.live_snapshots
        """Snapshots reference the live tensors (FailureConfig.live_snapshots); turned off for good
        when the training loop runs collectives between optimizer.step() and ctx.commit()."""

    def latest_durable_step(self) -> int:
        """The newest step whose checkpoint verifies (quickly: manifest and metadata): a corrupt
        newer one must not make survivors reload an older state than the one they hold."""
        info = self.catalog.latest_verified()
        return -1 if info is None else info.step

    def checkpoint_due(self, step: int) -> bool:
        n = self.run.checkpoint.every_n_steps
        return n > 0 and step % n == 0
