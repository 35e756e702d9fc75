"""How a run ends when it does not finish: failing (after a final save when the policy asks for
one), and stopping on SIGINT/SIGTERM.

A failure takes in the members' last words, or has the survivors commit the newest state they
hold, and says so in the error when that state could not be committed. A stop commits within
stop_timeout_s, fences what is still saving past it, reads the truth from storage and ends with the
exit code a stopped process has (128 + signal) only when the newest state is committed. The policy
decides when a run fails; this carries it out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from elastic._internal.events import Event
from elastic._internal.protocol import AssignmentMode, WorkerPoll, WorkerState
from elastic._internal.supervisor import policy as pol
from elastic._internal.supervisor.decisions import Fail
from elastic._internal.supervisor.states import Failed, Stopped, Stopping

if TYPE_CHECKING:
    from elastic._internal.supervisor.controller import Controller


def _any_running(polls: dict[int, pol.Poll]) -> bool:
    return any(isinstance(p, WorkerPoll) and p.state == WorkerState.RUNNING for p in polls.values())


class Ending:
    def __init__(self, ctl: Controller):
        self._ctl = ctl

    def fail(self, d: Fail, *, survivors: list[int] | None = None) -> Failed:
        """End the run failed, as the policy decided: with a final save by the survivors when it
        asks for one, else once the members' last words are in."""
        ctl = self._ctl
        error = d.error.replace("{resources}", ctl.group.describe_resources()) if "{resources}" in d.error \
            else d.error
        if d.final_save and survivors:
            self.final_save(survivors)
            ledger = ctl.ledger
            if ledger.committed_step < ledger.progress.step:
                error += (f"; the final checkpoint (step {ledger.progress.step}) was not committed: the newest "
                          f"committed one is step {ledger.committed_step}")
        else:
            self._last_words()
        return Failed(error=error, exit_code=d.exit_code)

    def _last_words(self) -> None:
        """Take in what the members still have to say before the run ends: their answers arrive
        one by one, and the one that decided the failure may precede the event another rank sent
        with its own failure. Bounded by the policy's last_words_s; over once none is running."""
        ctl = self._ctl
        f = ctl.run.failure
        deadline = ctl.clock() + ctl.policy.last_words_s
        while True:
            polls = ctl.poll(ctl.roster.members, min(f.poll_timeout_s, ctl.policy.last_words_s))
            if ctl.clock() >= deadline or not _any_running(polls):
                return
            ctl.sleep(f.poll_interval_s)

    def final_save(self, survivors: list[int], *, timeout_s: float | None = None) -> None:
        """The run ends unfinished: have the survivors commit the newest state they hold, so that
        `elastic resume` starts from it rather than from an older periodic checkpoint. Bounded."""
        ctl = self._ctl
        ctl.formation.build(survivors, reason="final checkpoint", mode=AssignmentMode.SAVE)
        self._wait_while_running(ctl.clock() + (timeout_s if timeout_s is not None
                                                else ctl.policy.final_save_timeout(ctl.run)))

    def _wait_while_running(self, deadline: float) -> None:
        """Poll the members until none is running, or until the deadline."""
        ctl = self._ctl
        f = ctl.run.failure
        while ctl.clock() < deadline:
            polls = ctl.poll(ctl.roster.members, f.poll_timeout_s)
            if not _any_running(polls):
                return
            ctl.sleep(f.poll_interval_s)

    def stop(self, state: Stopping) -> Stopped:
        """Commit the newest state the group holds, within stop_timeout_s, and end. A running group
        commits at its next agreed step boundary (as for a preemption notice) and leaves; without
        one (a stop during a rebuild) the survivors commit what they hold."""
        ctl = self._ctl
        t0 = ctl.clock()
        deadline = t0 + ctl.run.stop_timeout_s
        if state.survivors:
            self.final_save(list(state.survivors), timeout_s=ctl.run.stop_timeout_s)
        else:
            ctl.group.request_stop(ctl.roster.members)
            self._wait_while_running(deadline)
        self._fence()
        return self.stopped(state.signal, started=t0)

    def _fence(self) -> None:
        """Past the stop's deadline nothing may commit: members still at work (a save not committed
        in time) are killed before the run declares its end, and the truth is then read from storage
        (a commit whose event had not arrived yet counts; one that had not happened never will)."""
        ctl = self._ctl
        polls = ctl.poll(ctl.roster.members, ctl.run.failure.poll_timeout_s)
        for wid in [w for w, p in polls.items() if isinstance(p, WorkerPoll) and p.state == WorkerState.RUNNING]:
            ctl.roster.emit(Event.WORKER_LEFT, wid, reason="stopped: still saving at the stop timeout")
            ctl.group.kill(wid)
        ledger = ctl.ledger
        if ledger.storage_step is not None:
            ledger.committed_step = max(ledger.committed_step, ledger.storage_step())

    def stopped(self, signal: int, *, started: float) -> Stopped:
        """The run ends stopped by `signal`: committed (exit 128 + signal) or not (exit 1)."""
        ctl, ledger = self._ctl, self._ctl.ledger
        newest = max(ledger.newest_step, ledger.progress.step)
        committed = ledger.committed_step >= newest or newest <= 0
        # 128 + signal when the newest state is committed (what a stopped process exits with); 1 when
        # it is not: the caller learns it from the exit code alone (and from run_stopped.committed).
        name = {2: "SIGINT", 15: "SIGTERM"}.get(signal, f"signal {signal}")
        timeout = ctl.run.stop_timeout_s
        if committed:
            message = (f"stopped by {name} at step {newest}; its state is committed: continue with "
                       "`elastic resume URI`")
        else:
            message = (f"stopped by {name} at step {newest}, but that state could not be committed within "
                       f"{timeout:g}s (newest committed: step {ledger.committed_step}); "
                       "`elastic resume URI` continues from there")
            ctl.events.emit(Event.CHECKPOINT_FAILED, step=newest, reason=f"not committed within the stop timeout "
                                                                         f"({timeout:g}s)")
        ctl.events.emit(Event.RUN_STOPPED, signal=name, step=newest, committed_step=ledger.committed_step,
                        committed=committed, seconds=round(ctl.clock() - started, 3))
        return Stopped(message=message, exit_code=128 + signal if committed else 1, committed=committed)
