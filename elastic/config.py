"""Run configuration: frozen, keyword-only dataclasses validated at construction.

Each field says what it controls; each validation error says what to change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from elastic.errors import ConfigError
from elastic._internal.storage import RunLocation
from elastic._internal.supervisor.decisions import Policy


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def default(config: type, name: str) -> Any:
    """The default of field `name` of a config dataclass: what other modules use instead of
    restating it (ElasticTrainer's keywords, Checkpointer's, the CLI's)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise AttributeError(f"{config.__name__} has no field {name!r} with a default")


MAX_DURATION_S = 1e8
"""Longest duration any option accepts (about 3 years): beyond it timers overflow."""


def require_duration(name: str, value: float, *, allow_zero: bool = False) -> None:
    """A duration must be a finite number of seconds, > 0 (>= 0 with allow_zero) and at most
    MAX_DURATION_S: inf or nan would make a bounded wait unbounded."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0) and value <= MAX_DURATION_S
    _require(ok, f"{name} must be a finite number of seconds {'>= 0' if allow_zero else '> 0'} and at most "
                 f"{MAX_DURATION_S:g}, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScalingConfig:
    min_workers: int = 1
    """Fewest workers the run may train with; below this it waits (bounded), then fails."""
    max_workers: int | None = None
    """Most workers the run grows to when the cluster has room (default: min_workers)."""
    cpus_per_worker: float = 1.0
    """Ray CPUs reserved by each worker actor."""
    gpus_per_worker: float = 0.0
    """Ray GPUs reserved by each worker actor: 0 (CPU), 1 (a GPU per rank, NCCL by default), or a
    fraction (ranks sharing a GPU, over gloo: NCCL refuses two ranks on one device)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """The training group's backend: auto = nccl with one GPU per rank, gloo otherwise. The runtime's
    own control plane is always gloo."""
    spares: int = 0
    """Warm spare workers (torch imported, not training) kept ready to replace a failed rank; each
    reserves cpus_per_worker (and gpus_per_worker) like a training rank."""
    standby_per_node: int = 1
    """Warm standby processes kept on each node that hosts ranks: torch imported and the training
    function loaded, but no CPU or GPU reserved (memory is their only cost). A rank that dies is
    replaced by its node's standby in a fraction of a second instead of a cold start; the standby
    then takes the dead rank's CPU (and GPU) reservation. 0 turns them off."""
    placement_timeout_s: float = 60.0
    """How long to wait for the cluster to place min_workers before giving up."""
    grow_interval_s: float = 2.0
    """How often a run below max_workers checks whether the cluster gained room."""
    replacement: Literal["wait", "continue"] = "wait"
    """After a failure, with no warm spare: "wait" for a cold replacement (~2-3 s) and keep the
    world size (results stay bitwise equal to a failure-free run); "continue" at once with the
    survivors (if >= min_workers) and grow back when the replacement is ready (fastest recovery;
    results then match only up to float summation order)."""

    def __post_init__(self) -> None:
        if self.max_workers is None:
            object.__setattr__(self, "max_workers", self.min_workers)
        _require(self.min_workers >= 1, f"min_workers must be >= 1, got {self.min_workers}")
        assert self.max_workers is not None
        _require(
            self.min_workers <= self.max_workers,
            f"min_workers ({self.min_workers}) > max_workers ({self.max_workers}): "
            "set --min-workers at or below --max-workers",
        )
        _require(math.isfinite(self.cpus_per_worker) and self.cpus_per_worker >= 0,
                 f"cpus_per_worker must be a finite number >= 0, got {self.cpus_per_worker}")
        _require(math.isfinite(self.gpus_per_worker) and 0 <= self.gpus_per_worker <= 1,
                 f"gpus_per_worker must be 0, 1 or a fraction (one device per rank), got {self.gpus_per_worker}")
        _require(self.backend in ("auto", "gloo", "nccl"), "backend must be 'auto', 'gloo' or 'nccl'")
        _require(self.backend != "nccl" or self.gpus_per_worker == 1,
                 "backend='nccl' needs gpus_per_worker=1: NCCL allows one rank per GPU (use gloo to share one)")
        _require(self.spares >= 0, f"spares must be >= 0, got {self.spares}")
        _require(self.standby_per_node >= 0, f"standby_per_node must be >= 0, got {self.standby_per_node}")
        require_duration("placement_timeout_s", self.placement_timeout_s)
        require_duration("grow_interval_s", self.grow_interval_s)
        _require(self.replacement in ("wait", "continue"), "replacement must be 'wait' or 'continue'")

    @property
    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            res["GPU"] = self.gpus_per_worker
        return res


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    uri: str | None = None
    """Where checkpoints and the event log live: file://, memory://, s3://, any fsspec URL or a
    plain path. None: a fresh local directory under the system temp dir."""
    every_n_steps: int = 100
    """Commit a durable checkpoint every this many steps (0: only at the end and on preemption)."""
    keep_last: int = 3
    """Committed checkpoints to keep; older ones are deleted after each commit (0 keeps all). The
    newest checkpoint that verifies is never deleted."""
    async_save: bool = True
    """Write shards in the background; the loop only stalls for the copy into host memory."""
    when_busy: Literal["wait", "skip"] = "wait"
    """If a save is due while the previous one is still writing: wait for it, or skip this one."""
    commit_timeout_s: float = 300.0
    """How long a save may take from the first shard write to the commit (the coordinator waits
    this long for every rank's shard, the other ranks as long for its verdict) before it is
    abandoned, uncommitted."""

    def __post_init__(self) -> None:
        _require(self.every_n_steps >= 0, f"every_n_steps must be >= 0, got {self.every_n_steps}")
        _require(self.keep_last >= 0, f"keep_last must be >= 0 (0 keeps all), got {self.keep_last}")
        _require(self.when_busy in ("wait", "skip"), "when_busy must be 'wait' or 'skip'")
        require_duration("commit_timeout_s", self.commit_timeout_s)


@dataclass(frozen=True, kw_only=True, slots=True)
class FailureConfig:
    max_failures: int = 3
    """Worker failures tolerated over the run (growth and graceful preemptions do not count);
    -1 for unlimited. One more ends the run with a committed checkpoint to resume from."""
    collective_timeout_s: float = 30.0
    """Process-group timeout: bounds how long a collective blocks on a frozen peer. Size it above
    the longest legitimate skew between ranks (slowest step, checkpoint planning)."""
    hang_timeout_s: float = 300.0
    """A rank whose step has not advanced for this long is declared hung and killed."""
    poll_interval_s: float = 0.1
    """How often the supervisor looks at what its workers said (a local check: workers push their
    news, and Ray pushes a worker's death)."""
    poll_timeout_s: float = 5.0
    """A live worker that does not answer within this long (beyond liveness_interval_s) is treated
    as frozen."""
    liveness_interval_s: float = 1.0
    """A worker with nothing new to say still answers this often: how a frozen one (SIGSTOP, GIL
    held) is found, within liveness_interval_s + poll_timeout_s."""
    backoff_base_s: float = 0.0
    """Pause before the n-th consecutive recovery: base * 2**(n-1), capped at backoff_max_s."""
    backoff_max_s: float = 10.0
    """Upper bound on the recovery back-off."""
    below_min_wait_s: float = 60.0
    """How long to wait for capacity when fewer than min_workers survive before failing."""
    snapshot_every_n_steps: int = 1
    """Copy the committed state into host memory every this many steps (when snapshots are
    copies: see live_snapshots). A survivor hands the newest copy to newcomers, so at most this
    many steps are lost per failure; the copy costs about one memcpy of the model and optimizer
    state per snapshot."""
    live_snapshots: bool = True
    """On CPU, the newest committed state is the live parameters and optimizer state themselves:
    they change only inside optimizer.step(), so between ctx.commit() and the next step they are
    that step's state, and a survivor hands them to newcomers as they are (no copy per step; a
    failure seen before optimizer.step() loses at most the step in progress). Copies are still
    taken for checkpoints, on GPUs (a side stream) and for sharded models (buddy copies), and a
    worker falls back to copies when its loop runs collectives after optimizer.step() and before
    ctx.commit() (a failure there would find the live state already changed). Every change to
    parameters and optimizer state must be an in-place op on the tensor itself (what torch's
    optimizers do; p.mul_() under no_grad anywhere in the step is fine), which moves its version
    counter. Changes the counters cannot see break live snapshots wherever they happen: through
    .data (p.data.mul_()), a numpy view, another tensor over the same memory, or an optimizer that
    updates p.data in step(). A sampled checksum (16 elements per tensor, taken at each commit)
    catches such a change when it touches a sampled element, at the next commit or when a failure
    would use the state: an error is logged, that state is not used, and the worker copies from
    then on. Loops that make such changes should turn this off."""
    buddy_overlap: bool = False
    """Sharded models (FSDP2): send each committed step's rows to the rank's buddy in the
    background while the next step runs, instead of inside ctx.commit(). Overlapped, the rank
    keeps its previous snapshot until every copy arrived: host copies are 4x the shard instead of
    3x, for the exchange's time off the commit (0.1 s for a 146 MB shard on loopback here, about
    what the background exchange takes from the step on a busy CPU). State on a GPU always
    overlaps (its rows are staged through the snapshot's host buffers)."""
    buddy_shm: bool = True
    """Sharded models: a buddy on the same node maps the rank's rows in shared memory (a memfd,
    one memcpy per commit) instead of receiving them over loopback TCP; the rows outlive the
    rank's process (a SIGKILL, the OOM killer), not its node, like a loopback copy held on that
    node. Off: every copy travels over the transfer plane."""

    def __post_init__(self) -> None:
        _require(self.max_failures >= -1, "max_failures must be >= -1 (-1: unlimited)")
        for name in ("collective_timeout_s", "hang_timeout_s", "poll_interval_s", "poll_timeout_s",
                     "liveness_interval_s"):
            require_duration(name, getattr(self, name))
        for name in ("backoff_base_s", "backoff_max_s", "below_min_wait_s"):
            require_duration(name, getattr(self, name), allow_zero=True)
        _require(self.backoff_max_s >= self.backoff_base_s, "backoff_max_s must be >= backoff_base_s")
        _require(self.snapshot_every_n_steps >= 1, "snapshot_every_n_steps must be >= 1")

    def failures_left(self, used: int) -> bool:
        return self.max_failures < 0 or used <= self.max_failures

    def backoff_s(self, consecutive: int) -> float:
        if consecutive <= 0 or self.backoff_base_s == 0:
            return 0.0
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** (consecutive - 1))


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """Everything the supervisor needs besides the training function."""

    name: str = "elastic"
    """Shown in progress lines and events."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    train_loop_config: dict = field(default_factory=dict)
    """Passed to the training function as its only argument."""
    progress_interval_s: float = 5.0
    """Seconds between progress lines."""
    stop_timeout_s: float = 20.0
    """On SIGINT/SIGTERM to the driver the workers commit the newest state they hold within this
    long, then the run ends (exit 130/143); a second signal ends it at once. Fits common grace
    periods (Kubernetes gives 30 s); set it below yours."""
    seed: int = 0
    """Seeds torch on every rank before the training function is entered."""
    policy: Policy | None = None
    """What the supervisor decides on failures, preemptions and room to grow: any object that
    satisfies elastic.policy.Policy (None: elastic.policy.DefaultPolicy())."""
    location: RunLocation | None = None
    """Where the run lives (checkpoints, events, lease), normalized and opened once
    (elastic._internal.storage.RunLocation); every actor reads it from here. None: made from checkpoint.uri
    (and None while that is None too); when given, checkpoint.uri is set to its URI."""

    def __post_init__(self) -> None:
        self._settle_location()
        require_duration("progress_interval_s", self.progress_interval_s)
        require_duration("stop_timeout_s", self.stop_timeout_s)

    def _settle_location(self) -> None:
        """One location: made from checkpoint.uri when not given, and checkpoint.uri its URI."""
        uri, loc = self.checkpoint.uri, self.location
        if uri is None and loc is None:
            return
        if loc is None:
            loc = RunLocation.of(uri)  # type: ignore[arg-type]
        elif uri is not None and (named := RunLocation.of(uri)) != loc:
            raise ConfigError(f"checkpoint.uri ({named!r}) and location ({loc!r}) name different places: give one "
                              "of them")
        object.__setattr__(self, "location", loc)
        if uri != loc.uri:
            object.__setattr__(self, "checkpoint", replace(self.checkpoint, uri=loc.uri))
