"""`elastic plot URI`: a PNG of a run's metric (loss by default) against the step, with the world
size underneath, every failure and resize marked where it happened, each recovered failure labelled
with what it cost, and the run's ETTR in the title.

Reads URI/metrics.jsonl and the event log; events carry wall-clock times, so each is placed at the
step rank 0 had committed when it happened. Needs matplotlib (`pip install 'elastic[plot]'`).
"""

from __future__ import annotations

import bisect
from typing import Any

from elastic._internal import retry
from elastic.errors import ConfigError, NoCheckpointError
from elastic._internal.events import Event, read_events
from elastic._internal.metrics import read_metrics

_FAIL = {Event.WORKER_FAILED.value, Event.GROUP_FAILED.value}
_RESIZE = {Event.RESIZED.value, Event.RECOVERED.value}


def step_at(times: list[float], steps: list[int], t: float) -> int:
    """The step committed last at wall-clock time t (the first step before any record)."""
    i = bisect.bisect_right(times, t)
    return steps[max(0, i - 1)] if steps else 0


def marks(records: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, list[tuple[int, Any]]]:
    """{"failures": [(step, reason)], "resizes": [(step, world_size)], "costs": [(step, cost_s)]}
    placed by time (a cost at the step where its failure was seen)."""
    pairs = sorted((float(r["time"]), int(r["step"])) for r in records if isinstance(r.get("time"), (int, float)))
    times, steps = [t for t, _ in pairs], [s for _, s in pairs]
    out: dict[str, list[tuple[int, Any]]] = {"failures": [], "resizes": [], "costs": []}
    for ev in events:
        t = ev.get("time")
        if not isinstance(t, (int, float)):
            continue
        if ev.get("event") == Event.WORKER_FAILED.value:
            out["failures"].append((step_at(times, steps, t), ev.get("reason")))
        elif ev.get("event") in _RESIZE and isinstance(ev.get("world_size"), int):
            out["resizes"].append((step_at(times, steps, t), ev["world_size"]))
        if ev.get("event") == Event.RECOVERED.value and isinstance(cost := ev.get("cost_s"), (int, float)):
            out["costs"].append((step_at(times, steps, t - cost), float(cost)))
    return out


def ettr(events: list[dict[str, Any]]) -> float | None:
    """The run's ETTR as its newest event that carries one says (None when none does)."""
    return next((float(e["ettr"]) for e in reversed(events) if isinstance(e.get("ettr"), (int, float))), None)


def plot(uri: str, out: str, metric: str = "loss") -> str:
    """Write the PNG; returns a one-line summary. ConfigError / NoCheckpointError (one line) when
    there is nothing to plot or matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("elastic plot needs matplotlib: pip install 'elastic[plot]'") from None
    records, points, events = _series(uri, metric)
    m = marks(records, events)
    world = _world_sizes(records, events)
    fig, (ax, axw) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5), gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([s for s, _ in points], [v for _, v in points], lw=1.2, color="tab:blue", label=metric)
    for i, (step, _reason) in enumerate(m["failures"]):
        for a in (ax, axw):
            a.axvline(step, color="tab:red", ls="--", lw=1, label="worker failed" if i == 0 and a is ax else None)
    for i, (step, _size) in enumerate(m["resizes"]):
        ax.axvline(step, color="tab:green", ls=":", lw=1.2, label="resumed / resized" if i == 0 else None)
    for step, cost in m["costs"]:
        ax.annotate(f"{cost:.2f}s", (step, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="tab:red", rotation=90, va="top")
    run_ettr = ettr(events)
    ax.set_ylabel(metric)
    ax.set_title(f"{uri}: {metric} by step ({len(m['failures'])} failures, {len(m['resizes'])} recoveries/resizes"
                 + (f", ETTR {run_ettr:.3f}" if run_ettr is not None else "") + ")", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    if world:
        xs = [s for s, _ in world] + [points[-1][0]]
        ys = [w for _, w in world] + [world[-1][1]]
        axw.step(xs, ys, where="post", color="tab:gray")
        axw.set_ylim(0, max(ys) + 1)
    axw.set_ylabel("world size")
    axw.set_xlabel("step")
    axw.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    lost = f", their costs labelled, ETTR {run_ettr:.3f}" if run_ettr is not None else ""
    return (f"wrote {out}: {metric} over {len(points)} steps, {len(m['failures'])} failures and "
            f"{len(m['resizes'])} recoveries/resizes marked{lost}")


def _series(uri: str, metric: str) -> tuple[list[dict[str, Any]], list[tuple[int, float]], list[dict[str, Any]]]:
    """The run's metric records, the (step, value) points of `metric`, and its events; one line
    naming the fix when there is nothing to plot."""
    records = retry.call(retry.STORAGE_READ, lambda: read_metrics(uri), op="read metrics", uri=uri)
    if not records:
        raise NoCheckpointError(f"no metrics at {uri} (no metrics.jsonl): the run has committed no step with "
                                "metrics yet, or the URI is wrong")
    points = [(r["step"], r[metric]) for r in records if isinstance(r.get(metric), (int, float))]
    if not points:
        known = sorted({k for r in records for k in r if k not in ("step", "time")})
        raise ConfigError(f"no metric {metric!r} at {uri}: it has {', '.join(known) or 'none'}; pass --metric NAME")
    events = retry.call(retry.STORAGE_READ, lambda: read_events(uri), op="read events", uri=uri)
    return records, points, events


def _world_sizes(records: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(step, world size) at each group built."""
    pairs = sorted((float(r["time"]), int(r["step"])) for r in records if isinstance(r.get("time"), (int, float)))
    times, steps = [t for t, _ in pairs], [s for _, s in pairs]
    return [(step_at(times, steps, ev["time"]), ev["world_size"]) for ev in events
            if ev.get("event") == Event.GROUP_BUILT.value and isinstance(ev.get("world_size"), int)
            and isinstance(ev.get("time"), (int, float)) and ev.get("reason") != "final checkpoint"]
