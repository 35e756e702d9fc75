"""The driver side: ElasticTrainer starts a supervisor actor and follows it until the run ends.

The driver holds no training state. If it dies, the supervisor and the workers it owns stop with
it (Ray fate sharing), and `elastic resume URI` continues from the newest committed checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from elastic.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from elastic.errors import ConfigError, StorageUnavailableError, TrainingFailedError
from elastic.progress import ProgressPrinter
from elastic.result import Result
from elastic.storage import normalize_uri, resolve

RUN_SPEC_FILE = "run.json"


def _default_uri(name: str) -> str:
    return normalize_uri(os.path.join(tempfile.gettempdir(), "elastic-runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))


def check_storage(uri: str) -> None:
    """Fail fast, before any actor starts, on a location that cannot work."""
    fs, root = resolve(uri)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "memory" in protocols:
        raise ConfigError(f"{uri!r}: memory:// lives inside one process and workers are separate processes: "
                          "use file:// or an object store (s3://, gs://)")
    try:
        fs.makedirs(root, exist_ok=True)
        probe = f"{root}/.elastic-probe"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as exc:  # noqa: BLE001 - any failure here means the location is unusable
        raise StorageUnavailableError(f"cannot write to {uri!r} ({type(exc).__name__}: {exc}): "
                                      "check the path, bucket and credentials") from None


def ensure_ray(address: str | None, run: RunConfig) -> None:
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    sc = run.scaling
    assert sc.max_workers is not None
    # A local cluster gets enough logical CPUs for the largest group (and spares): the point of a
    # laptop run is to exercise the real thing, not to refuse it.
    cpus = max(os.cpu_count() or 1, int((sc.max_workers + sc.spares) * sc.cpus_per_worker + 0.999))
    # address="local": always a fresh embedded cluster, never silently another one found on this host.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}})


class ElasticTrainer:
    def __init__(
        self,
        train_fn: Callable[[dict], Any],
        *,
        train_loop_config: dict | None = None,
        scaling: ScalingConfig | None = None,
        checkpoint: CheckpointConfig | None = None,
        failure: FailureConfig | None = None,
        name: str = "elastic",
        seed: int = 0,
        progress_interval_s: float = 5.0,
        address: str | None = None,
        entrypoint: str | None = None,
    ):
        if not callable(train_fn):
            raise ConfigError(f"train_fn must be callable, got {type(train_fn).__name__}")
        checkpoint = checkpoint or CheckpointConfig()
        uri = normalize_uri(checkpoint.uri) if checkpoint.uri else _default_uri(name)
        self.run = RunConfig(name=name, scaling=scaling or ScalingConfig(), checkpoint=replace(checkpoint, uri=uri),
                             failure=failure or FailureConfig(), train_loop_config=dict(train_loop_config or {}),
                             progress_interval_s=progress_interval_s, seed=seed)
        self.train_fn = _shippable(train_fn)
        self.uri = uri
        self.address = address
        self.entrypoint = entrypoint

    def fit(self, *, raise_on_failure: bool = True, quiet: bool = False) -> Result:
        from elastic.supervisor.actor import RemoteSupervisor

        check_storage(self.uri)
        self._write_spec()
        ensure_ray(self.address, self.run)
        printer = ProgressPrinter(self.run.progress_interval_s)
        # The supervisor lives on the driver's node (normally the head, not a spot node): losing a
        # worker node must never take the supervisor with it.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        sup = RemoteSupervisor.options(num_cpus=0, max_concurrency=4, max_restarts=0,
                                       scheduling_strategy=here).remote(self.train_fn, self.run, self.uri)
        done_ref = sup.run.remote()
        try:
            while True:
                ready, _ = ray.wait([done_ref], timeout=0.5)
                try:
                    prog, events = ray.get(sup.progress.remote(), timeout=10)
                except Exception:  # noqa: BLE001 - progress is best effort; the run ref is the truth
                    prog, events = {}, []
                if not quiet:
                    printer.events(events)
                    printer.progress(prog)
                if ready:
                    break
            result: Result = ray.get(done_ref)
        finally:
            _stop_supervisor(sup)
        if not quiet:
            print(result.summary(), flush=True)
        if not result.ok and raise_on_failure:
            err = TrainingFailedError(result.error or "training failed")
            err.exit_code = result.exit_code
            raise err
        return result

    def _write_spec(self) -> None:
        """URI/run.json: what `elastic resume URI` needs to start the same run again."""
        if self.entrypoint is None:
            return
        fs, root = resolve(self.uri)
        spec = {"entrypoint": self.entrypoint, "name": self.run.name, "seed": self.run.seed,
                "train_loop_config": self.run.train_loop_config,
                "scaling": asdict(self.run.scaling), "checkpoint": asdict(self.run.checkpoint),
                "failure": asdict(self.run.failure)}
        with fs.open(f"{root}/{RUN_SPEC_FILE}", "w") as f:
            json.dump(spec, f, indent=2, default=str)


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
    fs, root = resolve(uri)
    path = f"{root}/{RUN_SPEC_FILE}"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)
