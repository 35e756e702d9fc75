"""Unit: the default policy's decision table, branch by branch, with made-up polls and clock values."""

from __future__ import annotations

from dataclasses import replace

import pytest

from elastic.config import FailureConfig, RunConfig, ScalingConfig
from elastic._internal.protocol import ErrorSignature, FailureKind, PollFailure, WorkerError, WorkerPoll
from elastic._internal.supervisor.decisions import (Build, Continue, Fail, Finish, Policy, Remove, Resize, ResizeReason,
                                          Restart, Retry, WaitForWorkers)
from elastic._internal.supervisor.policy import (DefaultPolicy, MembershipView, QuiesceView, RunningView, StartView,
                                       classify, shared_error)

pytestmark = pytest.mark.timeout(30)

P = DefaultPolicy()


def run(min_w=2, max_w=3, replacement="wait", max_failures=3, **failure) -> RunConfig:
    return RunConfig(scaling=ScalingConfig(min_workers=min_w, max_workers=max_w, replacement=replacement,
                                           placement_timeout_s=10),
                     failure=FailureConfig(max_failures=max_failures, poll_timeout_s=2, collective_timeout_s=5,
                                           below_min_wait_s=20, hang_timeout_s=60, **failure))


def poll(state="running", *, step=5, age=0.0, waiting=None, error=None, kind=FailureKind.USER, preempted=False,
         park=None) -> WorkerPoll:
    return WorkerPoll(state=state, generation=0, step=step, progress_age_s=age, waiting_in_collective_s=waiting,
                      failure=WorkerError(kind, error) if error else None, preempted=preempted, park_reason=park)


def running(polls, members=(0, 1, 2), newcomers=0, grow_due=False, r=None):
    h = classify(polls, (r or run()).failure)
    return P.running(r or run(), h, RunningView(members=tuple(members), newcomers=newcomers, grow_due=grow_due))


# -- running ---------------------------------------------------------------------------------
def test_all_running_continues():
    assert running({0: poll(), 1: poll(), 2: poll()}) == Continue()


def test_a_fatal_error_fails_with_exit_2_naming_it():
    d = running({0: poll(), 1: poll("failed", error="CheckpointMismatchError: shapes", kind=FailureKind.FATAL),
                 2: poll()})
    assert d == Fail(error="CheckpointMismatchError: shapes", exit_code=2)


def test_every_rank_finished_finishes():
    assert running({0: poll("finished"), 1: poll("finished"), 2: poll("finished")}) == Finish()


@pytest.mark.parametrize("polls,lost,words", [
    ({0: poll(), 1: PollFailure.DEAD, 2: poll()}, (1,), "rank(s) 1 died"),
    ({0: poll(), 1: PollFailure.UNRESPONSIVE, 2: poll()}, (1,), "rank(s) 1 stopped answering"),
    ({0: poll(age=61), 1: poll(), 2: poll()}, (0,), "rank(s) 0 hung"),
    ({0: poll(), 1: poll(), 2: poll("failed", error="Traceback ... ValueError")}, (2,), "rank(s) 2 raised"),
    ({0: poll("parked", park="broken"), 1: poll(), 2: poll()}, (), "left a broken process group"),
    ({0: poll("parked", park="pause"), 1: poll(), 2: poll()}, (), "left a broken process group"),
])
def test_losses_and_broken_groups_restart(polls, lost, words):
    d = running(polls)
    assert isinstance(d, Restart) and d.lost == lost and words in d.reason


def test_an_agreed_pause_for_a_preemption_is_a_resize_that_lets_the_notified_rank_go():
    polls = {0: poll("parked", park="pause"), 1: poll("parked", park="pause", preempted=True),
             2: poll("parked", park="pause")}
    assert running(polls) == Resize(reason="preemption", leaving=(1,))
    assert running(polls).reason is ResizeReason.PREEMPTION


def test_grow_only_when_due_below_max_and_someone_is_ready():
    polls = {0: poll(), 1: poll()}
    assert running(polls, members=(0, 1), newcomers=1, grow_due=True) == Resize(reason="grow")
    assert running(polls, members=(0, 1), newcomers=1, grow_due=True).reason is ResizeReason.GROW
    assert running(polls, members=(0, 1), newcomers=0, grow_due=True) == Continue()
    assert running(polls, members=(0, 1), newcomers=1, grow_due=False) == Continue()
    full = {0: poll(), 1: poll(), 2: poll()}
    assert running(full, newcomers=1, grow_due=True) == Continue()


def test_top_up_keeps_max_plus_spares_asked_for():
    r = RunConfig(scaling=ScalingConfig(min_workers=2, max_workers=3, spares=1))
    assert [P.to_request(r, have) for have in (0, 3, 4, 6)] == [4, 1, 0, 0]


def test_a_standby_starting_on_the_lost_node_defers_a_cold_request_for_one_start_up_and_half_the_placement_budget():
    """One rank lost, its node's standby still starting: no cold worker while the rebuild has waited
    less than a standby start-up (measured: startup_s), nor ever past half of placement_timeout_s
    (60 s here), so a cold worker asked for then still has the other half to be placed."""
    r = RunConfig(scaling=ScalingConfig(min_workers=2, max_workers=2, placement_timeout_s=60))
    assert P.to_request(r, 1) == 1
    assert P.to_request(r, 1, standbys_coming=1, waited_s=1.0, startup_s=3.0) == 0
    assert P.to_request(r, 1, standbys_coming=1, waited_s=3.5, startup_s=3.0) == 1
    assert P.to_request(r, 1, standbys_coming=1, waited_s=1.0) == 0  # none measured: standby_startup_s (5 s)
    assert P.to_request(r, 1, standbys_coming=1, waited_s=5.5) == 1
    # Standbys that take 100 s to start: the wait ends at half the placement budget.
    assert P.to_request(r, 1, standbys_coming=1, waited_s=29.0, startup_s=100.0) == 0
    assert P.to_request(r, 1, standbys_coming=1, waited_s=31.0, startup_s=100.0) == 1


# -- after a failure -------------------------------------------------------------------------
def test_failures_within_budget_retry_with_backoff_and_one_more_fails_with_a_final_save():
    r = run(max_failures=2, backoff_base_s=0.5, backoff_max_s=1.0)
    assert P.after_failure(r, 1, 1, "x") == Retry(backoff_s=0.5)
    assert P.after_failure(r, 2, 3, "x") == Retry(backoff_s=1.0)
    d = P.after_failure(r, 3, 4, "rank(s) 1 died")
    assert isinstance(d, Fail) and d.exit_code == 1 and d.final_save and "max_failures=2" in d.error
    assert P.after_failure(run(max_failures=-1), 10**6, 1, "x") == Retry(backoff_s=0.0)


KEY_ERROR = ErrorSignature(type="KeyError", message="0", where="/src/train.py:42", step=1)


def test_the_same_error_on_every_rank_in_two_generations_in_a_row_fails_at_once_in_one_line():
    r = run(max_failures=10)
    d = P.after_failure(r, 2, 2, "rank(s) 0,1 raised", (KEY_ERROR, KEY_ERROR))
    assert isinstance(d, Fail) and d.exit_code == 1 and not d.final_save
    assert d.error.startswith("KeyError: 0 at /src/train.py:42 (step 1), on every rank in 2 generations in a row: "
                              "fix the training function") and "\n" not in d.error
    # Once, another error, another step, or not on every rank (None): the budget decides.
    for repeated in [(KEY_ERROR,), (None, KEY_ERROR), (KEY_ERROR, None), (None, None),
                     (KEY_ERROR, replace(KEY_ERROR, step=2)), (replace(KEY_ERROR, where="/src/train.py:43"), KEY_ERROR)]:
        assert isinstance(P.after_failure(r, 2, 2, "x", repeated), Retry), repeated


def test_shared_error_is_the_signature_of_every_member_of_the_generation_or_none():
    def failed(sig, generation=3, kind=FailureKind.USER):
        return WorkerPoll(state="failed", generation=generation, step=0, progress_age_s=0.0,
                          waiting_in_collective_s=None, failure=WorkerError(kind, "Traceback ...", signature=sig))

    assert shared_error({0: failed(KEY_ERROR), 1: failed(KEY_ERROR)}, 3) == KEY_ERROR
    assert shared_error({0: failed(KEY_ERROR), 1: failed(KEY_ERROR, generation=2)}, 3) is None  # an old answer
    assert shared_error({0: failed(KEY_ERROR), 1: poll("parked", park="broken")}, 3) is None
    assert shared_error({0: failed(KEY_ERROR), 1: PollFailure.DEAD}, 3) is None
    assert shared_error({0: failed(KEY_ERROR), 1: failed(replace(KEY_ERROR, message="1"))}, 3) is None
    assert shared_error({0: failed(KEY_ERROR), 1: failed(KEY_ERROR, kind=FailureKind.FATAL)}, 3) is None
    assert shared_error({}, 3) is None


# -- quiescing the old group -----------------------------------------------------------------
def quiesce(polls, first_park=None, waited=0.0):
    return P.quiesce(run(), QuiesceView(polls=polls, since_first_park_s=first_park, waited_s=waited))


def test_quiesce_removes_the_dead_the_frozen_and_the_hung_first():
    assert quiesce({0: PollFailure.DEAD, 1: poll()}) == Remove(workers=(0,), label="died")
    assert quiesce({0: poll(), 1: PollFailure.UNRESPONSIVE}) == Remove(workers=(1,), label="stopped answering")
    assert quiesce({0: poll(age=61), 1: poll("parked")}) == Remove(workers=(0,), label="hung")


def test_quiesce_removes_a_rank_whose_own_error_is_reported_after_its_peers_parked():
    assert quiesce({0: poll("failed"), 1: poll("parked")}) == Remove(workers=(0,), label="failed")


def test_quiesce_blames_a_rank_stuck_outside_a_collective_a_poll_timeout_after_peers_left():
    polls = {0: poll("parked", park="broken"), 1: poll(waiting=None), 2: poll(waiting=1.0)}
    assert quiesce(polls, first_park=1.0) == Continue()  # not yet a poll timeout (2 s)
    assert quiesce(polls, first_park=2.5) == Remove(workers=(1,), label="stuck while its peers left the group")
    blocked = {0: poll("parked"), 1: poll(waiting=6.0)}  # blocked past the collective timeout (5 s)
    assert quiesce(blocked, first_park=2.5) == Remove(workers=(1,), label="stuck while its peers left the group")


def test_quiesce_removes_whoever_is_still_in_at_the_deadline_and_continues_when_all_left():
    deadline = P.quiesce_timeout_s(run())
    assert deadline == 5 + 2 + P.quiesce_slack_s
    assert quiesce({0: poll(waiting=0.1), 1: poll(waiting=0.1)}, waited=deadline) == \
        Remove(workers=(0, 1), label="stuck while its peers left the group")
    assert quiesce({0: poll("parked"), 1: poll("finished")}) == Continue()


# -- forming the next group ------------------------------------------------------------------
def membership(have, waited=0.0, no_room=None, **kw):
    return P.membership(run(**kw), MembershipView(have=have, waited_s=waited, no_room_for_s=no_room))


def test_membership_keeps_the_world_size_when_it_can():
    assert membership(3) == Build()
    assert membership(2) == WaitForWorkers()  # a replacement may be placed: wait for it
    assert membership(2, waited=10) == Build()  # ...but not past the placement timeout


def test_membership_goes_on_smaller_once_the_cluster_shows_no_room_for_the_settle_time():
    assert membership(2, no_room=P.settle_s / 2) == WaitForWorkers()
    assert membership(2, no_room=P.settle_s) == Build()


def test_membership_with_replacement_continue_builds_at_once_and_asks_for_the_rest_later():
    assert membership(2, replacement="continue") == Build(replacement_later=True)


def test_membership_below_min_waits_bounded_then_fails_with_a_final_save():
    assert membership(1, waited=5) == WaitForWorkers()
    assert membership(1, waited=10) == WaitForWorkers(below_min=True)
    d = membership(1, waited=30)
    assert isinstance(d, Fail) and d.final_save and d.exit_code == 1 and "below min_workers=2" in d.error


# -- starting --------------------------------------------------------------------------------
def test_start_waits_for_what_the_cluster_can_place_then_builds_or_fails_with_exit_2():
    r = run()
    assert P.start(r, StartView(ready=3, placeable=3, waited_s=0)) == Build()
    assert P.start(r, StartView(ready=2, placeable=3, waited_s=1)) == WaitForWorkers()
    assert P.start(r, StartView(ready=2, placeable=2, waited_s=0)) == Build()  # the cluster fits only 2
    assert P.start(r, StartView(ready=2, placeable=3, waited_s=10)) == Build()
    d = P.start(r, StartView(ready=1, placeable=3, waited_s=10))
    assert isinstance(d, Fail) and d.exit_code == 2 and "{resources}" in d.error


def test_policy_timings_are_validated():
    with pytest.raises(Exception, match="settle_s"):
        DefaultPolicy(settle_s=float("inf"))
    assert P.final_save_timeout(run()) == 2 * 5 + 2
    assert DefaultPolicy(final_save_timeout_s=7).final_save_timeout(run()) == 7


def test_a_rank_lost_with_its_node_goes_to_a_standby_on_a_live_node_never_one_on_the_dead_node():
    r = run(min_w=2, max_w=2)
    standbys = {"A": 10, "B": 11}
    # A process killed on a live node: that node's own standby (the fast path).
    assert P.standbys_to_promote(r, missing=1, standbys=standbys, lost_nodes=["B"]) == (11,)
    # Node B lost whole: its standby died with it, whatever its watch says yet; A's takes over.
    assert P.standbys_to_promote(r, missing=1, standbys=standbys, lost_nodes=["B"], dead_nodes={"B"}) == (10,)
    # Two ranks lost, one to a kill on A and one with node B: A's standby for A, none is left for B.
    assert P.standbys_to_promote(r, missing=2, standbys=standbys, lost_nodes=["A", "B"], dead_nodes={"B"}) == (10,)
    # Across nodes only to reach min_workers: a run that may go on smaller does so, without crowding.
    assert P.standbys_to_promote(run(min_w=1, max_w=2), missing=1, standbys=standbys, lost_nodes=["B"],
                                 dead_nodes={"B"}) == ()
    # Across nodes only without GPUs (a GPU is not shared), and only when the policy allows it.
    gpu = replace(r, scaling=replace(r.scaling, gpus_per_worker=1))
    assert P.standbys_to_promote(gpu, missing=1, standbys=standbys, lost_nodes=["B"], dead_nodes={"B"}) == ()
    assert DefaultPolicy(promote_across_nodes=False).standbys_to_promote(
        r, missing=1, standbys=standbys, lost_nodes=["B"], dead_nodes={"B"}) == ()



def test_the_standby_pool_covers_the_failures_expected_during_one_start_up():
    from elastic.config import RunConfig, ScalingConfig

    p = DefaultPolicy()
    run = RunConfig()
    size = lambda n, w, s=4.0: p.standbys_per_node(run, failures_in_window=n, window_s=w, startup_s=s)  # noqa: E731
    assert size(0, 600) == 1  # no failure seen: the configured one
    assert size(10, 300) == 1  # a failure every 30 s, 4 s start-ups: P(two within one) < 2 %
    assert size(8, 64) == 2  # every 8 s: a second failure during a start-up is likely enough
    assert size(60, 60, 10.0) == p.standby_max_per_node  # capped
    assert size(1, 1) == 1  # one early failure is not a rate: the window counts at least a minute
    # A standby serves its own node: the run's failures over four nodes are a quarter as many on each.
    assert size(8, 64) == 2 and p.standbys_per_node(run, failures_in_window=8, window_s=64, startup_s=4.0,
                                                    nodes=4) == 1
    assert p.standbys_per_node(RunConfig(scaling=ScalingConfig(standby_per_node=0)), failures_in_window=50,
                               window_s=60, startup_s=4.0) == 0  # turned off stays off


# -- the protocol ----------------------------------------------------------------------------
def test_resize_reasons_are_an_enum_whose_values_are_the_strings_events_carry():
    import json

    assert {r.value for r in ResizeReason} == {"grow", "preemption", "spread"}
    assert ResizeReason.GROW == "grow" and f"{ResizeReason.GROW}" == "grow" and json.dumps(ResizeReason.GROW) == '"grow"'


def test_the_default_policy_satisfies_the_protocol_and_the_controller_asks_nothing_else():
    import ast
    import inspect
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "elastic/_internal/supervisor/controller.py").read_text()
    asked = {node.attr for node in ast.walk(ast.parse(src)) if isinstance(node, ast.Attribute)
             and isinstance(node.value, ast.Attribute) and node.value.attr == "policy"
             and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    declared = {name for name in vars(Policy) if not name.startswith("_")}
    assert asked and asked <= declared, f"the controller asks, undeclared: {sorted(asked - declared)}"
    for name in declared:
        assert hasattr(P, name), f"DefaultPolicy lacks {name}"
        member = vars(Policy)[name]
        if isinstance(member, property):
            assert isinstance(getattr(P, name), float), name
            continue
        ours = inspect.signature(getattr(DefaultPolicy, name)).parameters.values()
        theirs = inspect.signature(member).parameters.values()
        assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs], name
