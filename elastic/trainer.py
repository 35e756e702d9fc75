"""The driver side: ElasticTrainer takes the run's location, starts a supervisor actor and follows
it until the run ends.

Order matters: the lease on the location comes first (a second run on a live run's location is
refused before it writes anything), then the storage probe and the run spec, then Ray.

The driver holds no training state. The first SIGINT/SIGTERM asks the supervisor to commit the
newest state the workers hold and end (exit 130/143); a second one ends the run at once. If the
driver dies, its supervisor notices and stops the workers, and `elastic resume URI` continues from
the newest committed checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from elastic._internal import lease as lease_mod
from elastic._internal.cluster import connection_problem, ensure_ray
from elastic._internal import retry, storage, trusted
from elastic.callbacks import Callback, Callbacks
from elastic.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, default
from elastic.errors import ConfigError, StorageUnavailableError, TrainingFailedError
from elastic._internal.progress import ProgressPrinter
from elastic.result import Result
from elastic._internal.storage import RunLocation, resolve
from elastic._internal.supervisor.decisions import Policy
from elastic._internal.supervisor.policy_record import policy_spec

RUN_SPEC_FILE = "run.json"
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _default_location(name: str) -> RunLocation:
    """CheckpointConfig.uri None: a fresh local directory under the system temp dir."""
    return RunLocation.of(os.path.join(tempfile.gettempdir(), "elastic-runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))


def check_storage(where: str | RunLocation) -> None:
    """Fail fast, before any actor starts, on a location that cannot work."""
    loc = RunLocation.of(where)
    fs, root, uri = loc.fs, loc.root, loc.uri
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "memory" in protocols:
        raise ConfigError(f"{retry.redact(uri)!r}: memory:// lives inside one process and workers are separate "
                          "processes: use file:// or an object store (s3://, gs://)")
    try:
        fs.makedirs(root, exist_ok=True)
        probe = f"{root}/.elastic-probe"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as exc:  # noqa: BLE001 - any failure here means the location is unusable
        raise StorageUnavailableError(retry.redact(f"cannot write to {uri!r} ({type(exc).__name__}: {exc}): "
                                                   "check the path, bucket and credentials")) from None


def resolve_entrypoint(spec: str) -> tuple[str, str]:
    """'file.py:fn' -> ('/abs/file.py:fn', sha256 of the file): what run.json records, so that a
    resume from anywhere runs the same file, and notices when it changed."""
    path_s, func = spec.rsplit(":", 1)
    path = Path(path_s).expanduser().resolve()
    return f"{path}:{func}", hashlib.sha256(path.read_bytes()).hexdigest()


class ElasticTrainer:
    def __init__(
        self,
        train_fn: Callable[[dict], Any],
        *,
        train_loop_config: dict | None = None,
        scaling: ScalingConfig | None = None,
        checkpoint: CheckpointConfig | None = None,
        failure: FailureConfig | None = None,
        name: str = default(RunConfig, "name"),
        seed: int = default(RunConfig, "seed"),
        progress_interval_s: float = default(RunConfig, "progress_interval_s"),
        stop_timeout_s: float = default(RunConfig, "stop_timeout_s"),
        address: str | None = None,
        entrypoint: str | None = None,
        callbacks: Sequence[Callback] | None = None,
        policy: Policy | None = None,
    ):
        if not callable(train_fn):
            raise ConfigError(f"train_fn must be callable, got {type(train_fn).__name__}")
        checkpoint = checkpoint or CheckpointConfig()
        location = RunLocation.of(checkpoint.uri) if checkpoint.uri else _default_location(name)
        self.run = RunConfig(name=name, scaling=scaling or ScalingConfig(), checkpoint=replace(checkpoint, uri=None),
                             failure=failure or FailureConfig(), train_loop_config=dict(train_loop_config or {}),
                             progress_interval_s=progress_interval_s, stop_timeout_s=stop_timeout_s, seed=seed,
                             policy=policy, location=location)
        if policy is not None:
            _shippable(type(policy))  # a policy class from a plain file travels by value, as train_fn does
        self.train_fn = _shippable(train_fn)
        self.location = location
        self.uri = location.uri
        """The normalized URI of the run's location (self.location.uri)."""
        self.address = address
        self.entrypoint = entrypoint
        self.callbacks = list(callbacks or [])

    def fit(self, *, raise_on_failure: bool = True, quiet: bool = False) -> Result:
        self._callbacks = Callbacks(self.callbacks)
        lease = lease_mod.Lease(self.location)
        owner = lease.acquire(lease_mod.this_process(self.run.name))  # before anything else is written
        sup_box: list[Any] = []
        renewer = lease_mod.Renewer(lease, owner, on_lost=lambda why: [s.abort.remote(why) for s in sup_box]).start()
        try:
            check_storage(self.location)
            self._write_spec()
            ensure_ray(self.address, self.run)
            result = self._drive(owner, sup_box, quiet)
        finally:
            renewer.stop(release=True)
        self._callbacks.end(result)
        if not quiet:
            print(result.summary(), flush=True)
        if not result.ok and raise_on_failure:
            err = TrainingFailedError(result.error or "training failed")
            err.exit_code = result.exit_code
            raise err
        return result

    def _drive(self, owner: lease_mod.LeaseRecord, sup_box: list[Any], quiet: bool) -> Result:
        from elastic._internal.supervisor.actor import RemoteSupervisor

        printer = ProgressPrinter(self.run.progress_interval_s)
        # The supervisor lives on the driver's node (normally the head, not a spot node): losing a
        # worker node must never take the supervisor with it.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        sup = RemoteSupervisor.options(num_cpus=0, max_concurrency=4, max_restarts=0,
                                       scheduling_strategy=here).remote(self.train_fn, self.run, owner)
        sup_box.append(sup)
        signals = _Signals(sup, quiet, self.run.stop_timeout_s)
        done_ref = sup.run.remote()
        try:
            with signals:
                while not signals.aborted:
                    ready, _ = ray.wait([done_ref], timeout=0.5)
                    try:
                        prog, events, records = ray.get(sup.progress.remote(), timeout=10)
                    except Exception:  # noqa: BLE001 - progress is best effort; the run ref is the truth
                        prog, events, records = None, [], []
                    self._callbacks.steps(records)
                    self._callbacks.events(events)
                    if not quiet:
                        printer.events(events)
                        printer.progress(prog)
                    if ready:
                        break
                if signals.aborted:
                    return _aborted(self.uri, signals.signum)
            try:
                return ray.get(done_ref)
            except Exception as exc:  # noqa: BLE001 - the supervisor died: one line, not a traceback
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                lost = connection_problem()  # a driver cut off from its cluster: not the supervisor's death
                what = f"lost the Ray cluster: {lost}" if lost else "the supervisor died"
                return Result(ok=False, exit_code=1, error=retry.redact(
                    f"{what} ({type(exc).__name__}: {first}); continue with `elastic resume URI`"),
                    metrics={}, steps=0, seconds=0.0, failures=0, recoveries=[], checkpoint=None, uri=self.uri)
        finally:
            _stop_supervisor(sup)

    def _write_spec(self) -> None:
        """URI/run.json: what `elastic resume URI` needs to start the same run again (credentials in
        URIs are never stored; the run's location is wherever it is resumed from). The entry file is
        also recorded on this machine (elastic._internal.trusted): run.json alone is never trusted to name code."""
        if self.entrypoint is None:
            return
        fs, root = self.location.fs, self.location.root
        entry, digest = resolve_entrypoint(self.entrypoint)
        checkpoint = {k: v for k, v in asdict(self.run.checkpoint).items() if k != "uri"}
        spec = {"entrypoint": entry, "entrypoint_sha256": digest, "host": socket.gethostname(),
                "name": self.run.name, "seed": self.run.seed,
                "train_loop_config": self.run.train_loop_config,
                "scaling": asdict(self.run.scaling), "checkpoint": checkpoint,
                "failure": asdict(self.run.failure), "stop_timeout_s": self.run.stop_timeout_s,
                "policy": policy_spec(self.run.policy)}
        data = json.dumps(spec, indent=2, default=str).encode()
        retry.call(retry.STORAGE_WRITE, lambda: storage.write_bytes(fs, f"{root}/{RUN_SPEC_FILE}", data),
                   op="write run spec", uri=self.uri)
        trusted.remember(entry, digest)  # what `elastic resume` may run without asking (elastic._internal.trusted)


class _Signals:
    """SIGINT/SIGTERM while the driver follows a run (main thread only: elsewhere Python cannot
    install handlers, and the host program keeps its own)."""

    def __init__(self, sup: Any, quiet: bool, stop_timeout_s: float):
        self.sup, self.quiet, self.stop_timeout_s = sup, quiet, stop_timeout_s
        self.signum: int | None = None
        self.aborted = False
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_EXIT:
                self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            self.sup.request_stop.remote(signum)
            print(f"[elastic] {name}: committing the newest state (up to {self.stop_timeout_s:g}s), then "
                  f"stopping; send it again to stop at once", file=sys.stderr, flush=True)
        else:
            self.aborted = True
            print(f"[elastic] {name} again: stopping at once", file=sys.stderr, flush=True)


def _aborted(uri: str, signum: int | None) -> Result:
    code = SIGNAL_EXIT.get(signum or signal.SIGINT, 130)
    return Result(ok=False, exit_code=code, error="stopped at once on a second signal: the newest committed "
                  "checkpoint is what `elastic resume URI` continues from", metrics={}, steps=0, seconds=0.0,
                  failures=0, recoveries=[], checkpoint=None, uri=uri, stopped=True)


def _shippable(fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """Send a function defined in a plain file (not an installed package) by value, so that
    workers on any node can run it without that file on their sys.path."""
    from ray import cloudpickle  # Ray serializes with its own vendored copy

    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    path = getattr(module, "__file__", None) or ""
    if module is not None and module.__name__ != "__main__" and path and "site-packages" not in path:
        top = sys.modules.get(module.__name__.split(".")[0])
        if top is not None and "site-packages" not in (getattr(top, "__file__", None) or "") \
                and module.__name__.split(".")[0] != "elastic":
            cloudpickle.register_pickle_by_value(module)
    return fn


def _stop_supervisor(sup: Any) -> None:
    try:
        ray.get(sup.close.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - it may already be gone; kill to be sure
        pass
    ray.kill(sup, no_restart=True)


def load_spec(uri: str) -> dict[str, Any] | None:
    """The run spec at `uri` (None when there is none); ConfigError naming the file when it is not
    one of ours."""
    fs, root = resolve(uri)
    path = f"{root}/{RUN_SPEC_FILE}"
    try:
        raw = retry.call(retry.STORAGE_READ, lambda: fs.cat_file(path), op="read run spec", uri=uri)
    except FileNotFoundError:
        return None
    try:
        spec = json.loads(raw)
        for key in ("entrypoint", "train_loop_config", "scaling", "checkpoint", "failure"):
            spec[key]  # noqa: B018 - presence check
        if not isinstance(spec["entrypoint"], str) or not isinstance(spec["train_loop_config"], dict):
            raise TypeError("entrypoint must be a string and train_loop_config an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{retry.redact(uri)}/{RUN_SPEC_FILE} is not a run spec ({type(exc).__name__}: {exc}): "
                          "start the run again with `elastic run`") from None
    return spec
