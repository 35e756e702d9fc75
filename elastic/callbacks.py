"""Hooks the driver calls while it follows a run: `ElasticTrainer(callbacks=[...])`.

- on_step(step, metrics): every committed step's metrics (rank 0's, or the ranks' means for steps
  committed with reduce=True), in order, as they reach the driver (within about a second).
- on_event(event): every event of the run's log (elastic._internal.events), e.g. a failure or a resize.
- on_end(result): once, with the run's Result, whether it finished or not.

They run on the driver, never on the workers: a slow callback delays what the driver prints,
not the training. A callback that raises is reported once and not called again; the run goes on.

Built-ins: TensorBoard (needs the `tensorboard` package: `pip install 'elastic[tensorboard]'`)
and CSV. Every run also writes URI/metrics.jsonl itself (elastic._internal.metrics), with or without these.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any, Sequence, TextIO

from elastic._internal.events import Event
from elastic.result import Result

log = logging.getLogger(__name__)

_MEMBERSHIP = {Event.GROUP_BUILT.value, Event.WORKER_FAILED.value, Event.WORKER_LEFT.value,
               Event.RECOVERED.value, Event.RESIZED.value}


class Callback:
    """Override what you need; every method does nothing by default."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_event(self, event: dict[str, Any]) -> None:
        pass

    def on_end(self, result: Result) -> None:
        pass


class Callbacks:
    """The driver's list of callbacks; one that raises is dropped with one warning."""

    def __init__(self, callbacks: Sequence[Callback] | None):
        self._cbs = list(callbacks or [])
        self.step = -1

    def steps(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            step = rec.get("step")
            if not isinstance(step, int):
                continue
            metrics = {k: v for k, v in rec.items() if k not in ("step", "time")}
            self.step = step
            self._call("on_step", step, metrics)

    def events(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            self._call("on_event", ev)

    def end(self, result: Result) -> None:
        self._call("on_end", result)

    def _call(self, name: str, *args: Any) -> None:
        for cb in list(self._cbs):
            try:
                getattr(cb, name)(*args)
            except Exception as exc:  # noqa: BLE001 - a user's hook must not end the run
                self._cbs.remove(cb)
                log.warning("callback %s.%s raised %s: %s; it is not called again", type(cb).__name__, name,
                            type(exc).__name__, exc)


class TensorBoard(Callback):
    """Scalars per step (each metric under its name), the world size at each membership change,
    and each event as text, in `logdir` (open with `tensorboard --logdir DIR`)."""

    def __init__(self, logdir: str | os.PathLike[str]):
        from elastic.errors import ConfigError

        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("the TensorBoard callback needs the tensorboard package: "
                              "pip install 'elastic[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(logdir))
        self._step = 0

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._step = step
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def on_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name in _MEMBERSHIP and isinstance(event.get("world_size"), int):
            self.writer.add_scalar("elastic/world_size", event["world_size"], self._step)
        if name in _MEMBERSHIP or name in (Event.RUN_FAILED.value, Event.RUN_STOPPED.value):
            fields = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "time", "members"))
            self.writer.add_text("elastic/_internal/events", f"{name}: {fields}", self._step)

    def on_end(self, result: Result) -> None:
        self.writer.flush()
        self.writer.close()


class CSV(Callback):
    """One row per step: step, then each metric (columns fixed by the first step's keys)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        self._file: TextIO | None = None
        self._writer: Any = None

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self._writer is None:
            self._file = open(self.path, "w", newline="")  # noqa: SIM115 - closed in on_end
            self._writer = csv.DictWriter(self._file, fieldnames=["step", *metrics], extrasaction="ignore")
            self._writer.writeheader()
        self._writer.writerow({"step": step, **metrics})

    def on_end(self, result: Result) -> None:
        if self._file is not None:
            self._file.close()
