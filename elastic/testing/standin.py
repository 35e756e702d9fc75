"""Stand-in workers for the control plane's scale harness on real Ray: actors that speak the worker
protocol (info, start, poll, watch, heartbeat, pause/preempt/stop) and "train" by counting steps
on a timer. They reserve no CPU and import no torch, so that hundreds fit on one machine
(scripts/bench_control_plane.py, tests/test_control_plane.py).

A running stand-in advances one step every `step_s`; asked to pause it parks at once. Killed (Ray,
or SIGKILL to its process), its outstanding watch fails at the supervisor, as a real worker's does.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

import ray

from elastic._internal.protocol import Assignment, ParkReason, Restored, WorkerInfo, WorkerPoll, WorkerState
from elastic._internal.worker.status import StatusBoard

if TYPE_CHECKING:
    from elastic._internal.supervisor.controller import Controller
    from elastic._internal.supervisor.worker_group import RayWorkerGroup
    from elastic.testing.simulated import NullEvents

STEP_S = 0.05


class StandInWorker:
    def __init__(self, fn_box: list[Any], run: Any, background: bool = False, lease_token: int = 0):
        self.board = StatusBoard()
        self._gen = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def info(self) -> WorkerInfo:
        ctx = ray.get_runtime_context()
        return WorkerInfo(pid=os.getpid(), node_id=ctx.get_node_id(), ip="127.0.0.1")

    def start(self, a: Assignment) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        self._stop = threading.Event()
        self._gen = a.generation
        self.board.update(state=WorkerState.RUNNING, generation=a.generation, failure=None, park_reason=None,
                          last_progress=time.monotonic())
        if a.rank == 0:
            from elastic._internal.events import Event

            step = max(0, self.board.get().step)
            self.board.update(restored=Restored(generation=a.generation, step=step))
            self.board.emit(Event.RESTORED, step=step, source="memory", generation=a.generation, lost_steps=0)
        self._thread = threading.Thread(target=self._train, args=(self._stop,), daemon=True)
        self._thread.start()

    def _train(self, stop: threading.Event) -> None:
        step = max(0, self.board.get().step)
        while not stop.wait(STEP_S):
            step += 1
            self.board.progress(step)

    def poll(self, ack: tuple[int, int] = (0, 0)) -> WorkerPoll:
        st = self.board.get()
        unsent = self.board.unsent(*ack)
        return WorkerPoll(state=st.state, generation=st.generation, step=st.step,
                          progress_age_s=time.monotonic() - st.last_progress, waiting_in_collective_s=None,
                          events=unsent.events, event_seq=unsent.event_seq, park_reason=st.park_reason,
                          committed_step=st.committed_step, restored=st.restored)

    def watch(self, version: int, step: int, timeout_s: float, ack: tuple[int, int] = (0, 0)) -> tuple[int, WorkerPoll]:
        version = self.board.wait_change(version, step, timeout_s)
        return version, self.poll(ack)

    def heartbeat(self) -> None:
        pass

    def layout(self) -> dict | None:
        """No sharded model: nothing for a standby to rehearse (worker/rehearsal.py)."""
        return None

    def rehearse(self, layout: dict | None) -> None:
        pass

    def _park(self) -> None:
        self._stop.set()
        if self.board.get().state is WorkerState.RUNNING:
            self.board.update(state=WorkerState.PARKED, park_reason=ParkReason.PAUSE)

    def request_pause(self) -> None:
        self._park()

    request_preempt = request_pause
    request_stop = request_pause


RemoteStandIn = ray.remote(StandInWorker)


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def measure(n: int, *, window_s: float = 5.0, kill: bool = True, ray_pids: tuple[int, ...] = (),
            start_timeout_s: float = 300.0, liveness_s: float = 1.0, poll_timeout_s: float = 5.0) -> dict[str, Any]:
    """Run the real controller and RayWorkerGroup over `n` stand-ins on the connected Ray cluster:
    the supervisor's cycle time and CPU (and Ray's: `ray_pids`) over `window_s` while nothing
    fails, then the time from SIGKILL of one stand-in to the supervisor's failure decision."""
    from elastic.config import FailureConfig, RunConfig, ScalingConfig
    from elastic._internal.supervisor.controller import Controller
    from elastic.testing.simulated import NullEvents
    from elastic._internal.supervisor.states import Starting, StateType
    from elastic._internal.supervisor.worker_group import RayWorkerGroup

    run = RunConfig(scaling=ScalingConfig(min_workers=1, max_workers=n, cpus_per_worker=0.0001, standby_per_node=0,
                                          placement_timeout_s=start_timeout_s),
                    failure=FailureConfig(max_failures=1, poll_timeout_s=poll_timeout_s, liveness_interval_s=liveness_s))
    group = RayWorkerGroup(lambda _c: None, run, worker_cls=RemoteStandIn)
    events = NullEvents(watch=("group_built", "worker_failed", "group_failed"))
    slept = [0.0]

    def sleep(dt: float) -> None:
        slept[0] += dt
        time.sleep(dt)

    ctl = Controller(run, group, events, ("127.0.0.1", 1), sleep=sleep)
    out: dict[str, Any] = {"n": n}
    state: Any = Starting()
    t0 = time.monotonic()
    try:
        while state.type is not StateType.RUNNING or len(ctl.members) < n:
            state = ctl.transition(state)
            if state.is_terminal() or time.monotonic() - t0 > start_timeout_s:
                raise RuntimeError(f"{n} stand-ins did not start within {start_timeout_s:g}s: {state}")
        out["start_s"] = time.monotonic() - t0
        for _ in range(int(2 / run.failure.poll_interval_s)):  # settle: every watch armed and answered
            state = ctl.transition(state)
        state = _steady(ctl, state, group, window_s, ray_pids, slept, out)
        if kill:
            _detect(ctl, state, group, events, out)
    finally:
        group.shutdown()
    return out


def _steady(ctl: Controller, state: Any, group: RayWorkerGroup, window_s: float, ray_pids: tuple[int, ...],
            slept: list[float], out: dict[str, Any]) -> Any:
    """Step the controller for `window_s` while nothing fails: its cycle time (without the time it
    slept) and the cores used by the supervisor, Ray and the stand-ins, into `out`; the state."""
    cycles: list[float] = []
    pids = [group.infos[w].pid for w in ctl.members]
    cpu0, ray0, ins0 = _self_cpu_s(), sum(_cpu_s(p) for p in ray_pids), sum(_cpu_s(p) for p in pids)
    w0 = time.monotonic()
    while time.monotonic() - w0 < window_s:
        c0, s0 = time.perf_counter(), slept[0]
        state = ctl.transition(state)
        cycles.append(time.perf_counter() - c0 - (slept[0] - s0))
    wall = time.monotonic() - w0
    out["cycle_ms_median"] = sorted(cycles)[len(cycles) // 2] * 1e3
    out["cycle_ms_p95"] = sorted(cycles)[int(len(cycles) * 0.95)] * 1e3
    out["supervisor_cores"] = (_self_cpu_s() - cpu0) / wall
    out["ray_cores"] = (sum(_cpu_s(p) for p in ray_pids) - ray0) / wall
    out["standin_cores"] = (sum(_cpu_s(p) for p in pids) - ins0) / wall
    return state


def _detect(ctl: Controller, state: Any, group: RayWorkerGroup, events: NullEvents, out: dict[str, Any]) -> None:
    """SIGKILL one stand-in and step the controller until it decides the worker failed (at most
    30 s): the seconds that took, into `out` (nan if it never did)."""
    import signal

    victim = ctl.members[len(ctl.members) // 2]
    before = events.first.get("worker_failed")
    t_kill = time.perf_counter()
    os.kill(group.infos[victim].pid, signal.SIGKILL)
    while events.first.get("worker_failed", before) is before and time.perf_counter() - t_kill < 30:
        state = ctl.transition(state)
    out["detect_s"] = events.first.get("worker_failed", float("nan")) - t_kill
