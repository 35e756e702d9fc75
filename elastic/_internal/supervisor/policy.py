"""Pure decisions: given what the workers answered, the failure budget and the clock, what next.

`classify` sorts a generation's polls into a Health; `DefaultPolicy` turns a Health (and small
views of the controller's bookkeeping) into the typed decisions of decisions.py. Nothing here
touches an actor or sleeps, so every branch is unit-testable with made-up polls and clock values.
A run can swap the policy through `RunConfig.policy` (any object that satisfies decisions.Policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection, Mapping

from elastic.config import FailureConfig, RunConfig
from elastic._internal.protocol import ErrorSignature, FailureKind, ParkReason, PollFailure, WorkerPoll, WorkerState
from elastic._internal.supervisor.decisions import (Build, Continue, Fail, Finish, Remove, Resize, ResizeReason, Restart,
                                          Retry, WaitForWorkers)

DEAD = PollFailure.DEAD
UNRESPONSIVE = PollFailure.UNRESPONSIVE

Poll = WorkerPoll | PollFailure


@dataclass(frozen=True)
class Health:
    """The members of a generation sorted by what their last poll said."""

    running: tuple[int, ...] = ()
    parked: tuple[int, ...] = ()
    finished: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()  # user code raised
    fatal: tuple[int, ...] = ()  # bad input: retrying cannot help
    dead: tuple[int, ...] = ()
    unresponsive: tuple[int, ...] = ()
    hung: tuple[int, ...] = ()  # answers polls, but no step progress for hang_timeout_s
    preempted: tuple[int, ...] = ()  # got a preemption notice (running or parked): leaving on purpose
    paused: tuple[int, ...] = ()  # parked at an agreed step boundary (not because the group broke)
    errors: dict[int, str] = field(default_factory=dict)
    exit_codes: dict[int, int] = field(default_factory=dict)
    """The exit code each fatal error asks for."""

    @property
    def lost(self) -> tuple[int, ...]:
        """Workers that must be removed and count as a failure."""
        return tuple(sorted(set(self.dead) | set(self.unresponsive) | set(self.hung) | set(self.failed)))

    @property
    def broken(self) -> tuple[int, ...]:
        """Parked because the group broke under them (not at an agreed boundary)."""
        return tuple(sorted(set(self.parked) - set(self.paused)))

    @property
    def alive(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.running) | set(self.parked) | set(self.finished)))


def classify(polls: Mapping[int, Poll], failure: FailureConfig) -> Health:
    buckets: dict[str, list[int]] = {k: [] for k in ("running", "parked", "finished", "failed", "fatal", "dead",
                                                     "unresponsive", "hung", "preempted", "paused")}
    errors: dict[int, str] = {}
    exit_codes: dict[int, int] = {}
    for wid, poll in sorted(polls.items()):
        if isinstance(poll, PollFailure) or poll in (DEAD, UNRESPONSIVE):
            buckets[PollFailure(poll).value].append(wid)
            continue
        assert isinstance(poll, WorkerPoll)
        if poll.failure is not None:
            errors[wid] = poll.failure.message
            exit_codes[wid] = poll.failure.exit_code
        if poll.preempted:
            buckets["preempted"].append(wid)
        if poll.state == WorkerState.FAILED:
            buckets["fatal" if poll.fatal else "failed"].append(wid)
        elif poll.state == WorkerState.PARKED:
            buckets["parked"].append(wid)
            if poll.park_reason == ParkReason.PAUSE:
                buckets["paused"].append(wid)
        elif poll.state == WorkerState.FINISHED:
            buckets["finished"].append(wid)
        elif poll.state == WorkerState.RUNNING and poll.progress_age_s > failure.hang_timeout_s:
            buckets["hung"].append(wid)
        else:
            buckets["running"].append(wid)
    return Health(**{k: tuple(v) for k, v in buckets.items()}, errors=errors, exit_codes=exit_codes)


def stragglers(polls: Mapping[int, Poll], blocked_for_s: float) -> tuple[int, ...]:
    """Ranks to blame when peers already left a broken group: still 'running' but not waiting in a
    collective while others parked, or stuck in a collective past `blocked_for_s`."""
    out = []
    for wid, poll in polls.items():
        if isinstance(poll, WorkerPoll) and poll.state == WorkerState.RUNNING:
            waiting = poll.waiting_in_collective_s
            if waiting is None or waiting > blocked_for_s:
                out.append(wid)
    return tuple(sorted(out))


# -- what the controller shows the policy ------------------------------------------------------
@dataclass(frozen=True)
class RunningView:
    members: tuple[int, ...]
    """Worker ids in rank order."""
    newcomers: int
    """Ready workers that are not members (spares, replacements placed late)."""
    grow_due: bool
    """grow_interval_s passed since the last look for room."""
    crowded: tuple[int, ...] = ()
    """Members promoted onto another rank's node when theirs was lost whole (promote_across_nodes),
    whose reservation waits: they hand over to a newcomer once one is ready, so that the next node
    lost does not take two ranks."""


@dataclass(frozen=True)
class StartView:
    ready: int
    placeable: int
    """Workers the cluster could place when the run started (beyond those asked for)."""
    waited_s: float


@dataclass(frozen=True)
class MembershipView:
    have: int
    """Members of the next generation found so far (survivors + ready newcomers)."""
    waited_s: float
    """Since the rebuild began looking for workers."""
    no_room_for_s: float | None
    """How long the cluster has shown no room for another worker (None: it has room)."""


@dataclass(frozen=True)
class QuiesceView:
    polls: Mapping[int, Poll]
    """The last answers of the members still in the old group."""
    since_first_park_s: float | None
    """Since the first member left (None: none has yet)."""
    waited_s: float


@dataclass(frozen=True, kw_only=True, slots=True)
class DefaultPolicy:
    """elastic's policy: keep the world size when a replacement can be placed, go on smaller when
    the cluster has no room (and min_workers allows), grow back when room appears, count failures
    against max_failures with back-off, and treat preemption notices as graceful resizes."""

    settle_s: float = 1.0
    """A rebuild that cannot place a replacement goes on with fewer workers (>= min_workers) once the
    cluster has shown no room for this long; a briefly busy cluster does not shrink the run."""
    quiesce_slack_s: float = 1.0
    """Ranks get collective_timeout_s + poll_timeout_s + this to leave the old group (a rank blocked
    on a frozen peer is released by the collective timeout); the ones still in it are then killed."""
    assignment_slack_s: float = 10.0
    """A worker must accept its assignment within poll_timeout_s + this, or it is lost."""
    drain_check_interval_s: float = 1.0
    """How often the supervisor asks Ray which nodes are draining."""
    standby_after_s: float = 0.0
    """Standbys (ScalingConfig.standby_per_node) start once the run's first group has taken its first
    step and trained this long (their start-up, a torch import at idle priority, would otherwise
    compete with every rank's own). After a rebuild, the successor of a promoted standby starts as
    soon as the new group has taken its first step."""
    standby_startup_s: float = 5.0
    """A standby's start-up time until one has been measured (request to ready)."""
    standby_rate_window_s: float = 600.0
    """The failure rate that sizes the standby pool is counted over this window (or the run so
    far, but at least a minute of it)."""
    standby_miss: float = 0.02
    """The pool covers the failures expected during one standby start-up: sized so that more of
    them than the pool holds happen with at most this probability (Poisson at the observed rate).
    On this 2-core machine (start-up 2.5-4 s): a failure every 8 s keeps 2, every 30 s keeps 1."""
    standby_max_per_node: int = 4
    """The pool never grows beyond this many standbys per node (each costs a process's memory)."""
    promote_across_nodes: bool = True
    """A rank lost with its whole node (Ray reports the node dead) is taken over by a standby on a
    live node when the run would otherwise be below min_workers (it could not train at all), which
    trains at once while its reservation waits in Ray's queue for room on its node; only for runs
    without GPUs (a GPU cannot be shared that way). False: such a rank waits for a newcomer (a
    spare, or a cold replacement)."""
    rendezvous_per_rank_s: float = 0.02
    """Added per rank to a generation's rendezvous bound (see rendezvous_timeout_s)."""
    last_words_s: float = 2.0
    """A run that fails waits this long at most for its other members' last answers (their events:
    one rank's failure is often seen a few milliseconds before the event another rank sent with
    its own, say the coordinator's checkpoint_failed), stopping as soon as none is running."""
    final_save_timeout_s: float | None = None
    """Bound on the survivors' final save when a run ends unfinished; None: 2 x collective_timeout_s
    + poll_timeout_s (a settle round and the save's own collectives)."""

    def __post_init__(self) -> None:
        from elastic.config import require_duration

        for name in ("settle_s", "quiesce_slack_s", "assignment_slack_s", "drain_check_interval_s", "standby_after_s",
                     "last_words_s", "rendezvous_per_rank_s", "standby_startup_s", "standby_rate_window_s"):
            require_duration(name, getattr(self, name), allow_zero=True)
        if self.final_save_timeout_s is not None:
            require_duration("final_save_timeout_s", self.final_save_timeout_s)

    # -- starting ----------------------------------------------------------------------------
    def start(self, run: RunConfig, v: StartView) -> Build | WaitForWorkers | Fail:
        sc = run.scaling
        assert sc.max_workers is not None
        goal = max(sc.min_workers, min(sc.max_workers, v.placeable))
        if v.ready >= goal:
            return Build()
        if v.waited_s < sc.placement_timeout_s:
            return WaitForWorkers()
        if v.ready >= sc.min_workers:
            return Build()
        return Fail(error=f"cannot place min_workers={sc.min_workers} workers of {sc.resources_per_worker} each "
                          f"within {sc.placement_timeout_s:g}s ({v.ready} placed; cluster: {{resources}}): "
                          "lower --min-workers or add nodes", exit_code=2)

    # -- running -----------------------------------------------------------------------------
    def running(self, run: RunConfig, h: Health, v: RunningView) -> Continue | Finish | Fail | Restart | Resize:
        if h.fatal:
            return Fail(error=h.errors.get(h.fatal[0], "fatal error"), exit_code=h.exit_codes.get(h.fatal[0], 2))
        if len(h.finished) == len(v.members):
            return Finish()
        # Ranks leave at an agreed boundary only for a preemption (Running asks for no other pause);
        # any other park means the group broke under them.
        if h.lost or h.broken or (h.paused and not h.preempted):
            return Restart(reason=describe_loss(h, v.members), lost=h.lost)
        if h.paused and h.preempted:
            return Resize(reason=ResizeReason.PREEMPTION, leaving=h.preempted)
        if v.grow_due and len(v.members) < (run.scaling.max_workers or 0) and v.newcomers > 0:
            return Resize(reason=ResizeReason.GROW)
        if v.crowded and v.newcomers > 0:
            return Resize(reason=ResizeReason.SPREAD, leaving=v.crowded[:v.newcomers])
        return Continue()

    def to_request(self, run: RunConfig, have: int, *, standbys_coming: int = 0, waited_s: float = 0.0,
                   startup_s: float | None = None) -> int:
        """Workers to ask for so that max_workers + spares are ready or on their way.
        `standbys_coming`: standbys still starting on the nodes of workers just lost, the rebuild
        having waited `waited_s`. Within one standby start-up (`startup_s` as measured, else
        standby_startup_s) they count as on their way: a cold worker asked for now would compete
        with them for the CPU the parked group freed, and stay on as a spare nobody asked for (a burst
        of kills on one node, docs/benchmarks.md: a 5.7 s rebuild with a cold worker competing, 4.7 s
        without). Never past half of placement_timeout_s: standbys that start slowly (a minute, on
        a loaded host) must leave a cold worker asked for then the other half to be placed."""
        sc = run.scaling
        assert sc.max_workers is not None
        if standbys_coming and waited_s < min(startup_s or self.standby_startup_s, sc.placement_timeout_s / 2):
            have += standbys_coming
        return max(0, sc.max_workers + sc.spares - have)

    # -- after a failure ---------------------------------------------------------------------
    def after_failure(self, run: RunConfig, failures: int, consecutive: int, reason: str,
                      repeated: tuple[ErrorSignature | None, ...] = ()) -> Retry | Fail:
        """`repeated`: the error every rank raised in each failed generation, for this one and the
        one just before it when they are consecutive (shared_error; None: not one error on every
        rank). The same on every rank in both is deterministic: ending now saves the budget."""
        f = run.failure
        if len(repeated) >= 2 and repeated[-1] is not None and repeated[-2] == repeated[-1]:
            return Fail(error=f"{repeated[-1].describe()}, on every rank in 2 generations in a row: fix the "
                              "training function (tracebacks: the worker_failed events)", exit_code=1)
        if not f.failures_left(failures):
            return Fail(error=f"failure budget spent: {failures} failures > max_failures={f.max_failures} "
                              f"(last: {reason}); the newest committed checkpoint is kept: continue with "
                              "`elastic resume URI`", exit_code=1, final_save=True)
        return Retry(backoff_s=f.backoff_s(consecutive))

    # -- leaving the old group ---------------------------------------------------------------
    def quiesce_timeout_s(self, run: RunConfig) -> float:
        f = run.failure
        return f.collective_timeout_s + f.poll_timeout_s + self.quiesce_slack_s

    def quiesce(self, run: RunConfig, v: QuiesceView) -> Remove | Continue:
        """Who must go while the members leave the old group: first those whose poll says they are
        dead, frozen, hung or failed (a rank whose own error broke the group, reported after its
        peers saw the group break: it is replaced, not kept as a survivor); then, a poll timeout
        after the first rank left, a rank neither finishing nor blocked in a collective (stuck in
        user code); at the deadline, everyone left."""
        f = run.failure
        h = classify(v.polls, f)
        for label, wids in (("died", h.dead), ("stopped answering", h.unresponsive), ("hung", h.hung),
                            ("failed", tuple(sorted(h.failed + h.fatal)))):
            if wids:
                return Remove(workers=wids, label=label)
        still = {w: p for w, p in v.polls.items() if isinstance(p, WorkerPoll) and p.state == WorkerState.RUNNING}
        if not still:
            return Continue()
        if v.waited_s >= self.quiesce_timeout_s(run):
            return Remove(workers=tuple(sorted(still)), label="stuck while its peers left the group")
        if v.since_first_park_s is not None and v.since_first_park_s > f.poll_timeout_s:
            blame = stragglers(still, f.collective_timeout_s)
            if blame:
                return Remove(workers=blame, label="stuck while its peers left the group")
        return Continue()

    # -- forming the next group --------------------------------------------------------------
    def membership(self, run: RunConfig, v: MembershipView) -> Build | WaitForWorkers | Fail:
        sc, f = run.scaling, run.failure
        assert sc.max_workers is not None
        if v.have >= sc.max_workers:
            return Build()
        if v.have >= sc.min_workers:
            if sc.replacement == "continue":
                return Build(replacement_later=True)  # the replacement joins later, through a grow
            if v.waited_s >= sc.placement_timeout_s:
                return Build()  # keep the world size when possible, but not forever
            if v.no_room_for_s is not None and v.no_room_for_s >= self.settle_s:
                return Build()  # no room for now: go on smaller, grow back when room appears
            return WaitForWorkers()
        if v.waited_s < sc.placement_timeout_s:
            return WaitForWorkers()
        if v.waited_s < sc.placement_timeout_s + f.below_min_wait_s:
            return WaitForWorkers(below_min=True)
        return Fail(error=f"only {v.have} workers available, below min_workers={sc.min_workers}, after waiting "
                          f"{f.below_min_wait_s:g}s (cluster: {{resources}}); resume later with "
                          "`elastic resume URI`", exit_code=1, final_save=True)

    def standbys_to_promote(self, run: RunConfig, *, missing: int, standbys: Mapping[str, int],
                            lost_nodes: list[str], dead_nodes: Collection[str] = ()) -> tuple[int, ...]:
        """Standbys to turn into workers for the next group: those on the nodes of the workers just
        lost (each such node has a worker's resources free again), up to the number missing. Never
        one on a node Ray reports dead (`dead_nodes`: it died with it, whatever its watch says yet);
        a rank lost with its node goes to a standby on a live node (promote_across_nodes)."""
        dead = set(dead_nodes)
        picks: list[int] = []
        for node in lost_nodes:
            wid = standbys.get(node)
            if len(picks) < missing and node not in dead and wid is not None and wid not in picks:
                picks.append(wid)
        # Across nodes only what the run needs to reach min_workers: with fewer it could not train
        # at all, while at min_workers or more it goes on smaller and grows back without crowding.
        sc = run.scaling
        below_min = sc.min_workers - ((sc.max_workers or 0) - missing) - len(picks)
        if self.promote_across_nodes and sc.gpus_per_worker <= 0 and below_min > 0:
            live = [w for n, w in sorted(standbys.items()) if n not in dead and w not in picks]
            for _node in [n for n in lost_nodes if n in dead][:below_min]:
                if len(picks) < missing and live:
                    picks.append(live.pop(0))
        return tuple(picks)

    def rendezvous_timeout_s(self, run: RunConfig, world_size: int) -> float:
        """Bound on a generation's rendezvous (every rank arriving, gloo's address exchange): the
        failure-detection bound (a member lost meanwhile is seen within it, and the others are
        told to leave), plus the exchange's own growth with the world size (quadratic in
        the store: 3.8 s at 256 ranks on 2 cores, elastic.testing.standin)."""
        f = run.failure
        return min(f.collective_timeout_s, f.liveness_interval_s + f.poll_timeout_s + self.rendezvous_per_rank_s * world_size)

    def standbys_per_node(self, run: RunConfig, *, failures_in_window: int, window_s: float,
                          startup_s: float | None, nodes: int = 1) -> int:
        """How many standbys to keep warm on each node that hosts ranks: at least
        ScalingConfig.standby_per_node, more when failures come often enough that a second one may
        arrive before a promoted standby's successor is up — the smallest pool that more failures
        than it holds overrun, during one start-up, with probability <= standby_miss.
        `failures_in_window` are the run's, over `nodes` nodes hosting ranks: a standby serves only
        its own node's failures, so each node expects its share. (Counting them all per node started
        3 standbys after a recovery at 4 ranks on 2 nodes, where 1 replaces the promoted one; each
        start-up takes 2.6 CPU-seconds from training on a node without cores to spare.)"""
        base = run.scaling.standby_per_node
        if base <= 0:
            return 0
        rate = failures_in_window / max(window_s, 60.0) / max(nodes, 1)
        expected = rate * (startup_s or self.standby_startup_s)
        k, p_le, term = 0, math.exp(-expected), math.exp(-expected)  # P(N <= k) for N ~ Poisson(expected)
        while 1.0 - p_le > self.standby_miss and k < self.standby_max_per_node:
            k += 1
            term *= expected / k
            p_le += term
        return min(self.standby_max_per_node, max(base, k))

    def final_save_timeout(self, run: RunConfig) -> float:
        f = run.failure
        if self.final_save_timeout_s is not None:
            return self.final_save_timeout_s
        return 2 * f.collective_timeout_s + f.poll_timeout_s


def shared_error(polls: Mapping[int, Poll | None], generation: int) -> ErrorSignature | None:
    """The error signature in every member's last poll of `generation` (each raised the same
    exception in user code, at the same place and step), else None."""
    sigs = {p.failure.signature if isinstance(p, WorkerPoll) and p.generation == generation and p.failure is not None
            and p.failure.kind is FailureKind.USER else None for p in polls.values()}
    return sigs.pop() if len(sigs) == 1 else None


def describe_loss(h: Health, members: tuple[int, ...] | list[int]) -> str:
    def ranks(wids: tuple[int, ...]) -> str:
        return ",".join(str(members.index(w)) if w in members else f"w{w}" for w in wids)

    parts = []
    for label, wids in (("died", h.dead), ("stopped answering", h.unresponsive), ("hung", h.hung),
                        ("raised", h.failed)):
        if wids:
            parts.append(f"rank(s) {ranks(wids)} {label}")
    if not parts:
        parts.append(f"rank(s) {ranks(h.parked)} left a broken process group")
    return "; ".join(parts)
