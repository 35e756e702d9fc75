"""Which Ray cluster a run trains on.

- An explicit address (`ElasticTrainer(address=...)`, `elastic run --address`) or, failing that,
  `RAY_ADDRESS` (what `ray job submit` sets for a job's driver): that cluster. Whether it checks a
  token is asked of its GCS first (`cluster_auth`: one call without a token), and RAY_AUTH_MODE is
  set to match when the user chose nothing: a driver sending a token to a cluster without token
  auth is dropped by its GCS right after it creates an actor, and one without a token is refused by
  a cluster with it (after 20 s of retries). An address that does not answer is one line, exit 2.
- Neither: a fresh local cluster sized for the run (`address="local"`: never silently another
  cluster found on this host).
- Ray already initialized in this process (a notebook, a second `fit()`): reused when it can
  place the run. A local cluster elastic started itself and that is too small for this run is
  replaced; anyone else's gets one line saying what is missing. (A cluster at an address is not
  checked: its autoscaler may add the nodes the run asks for.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import ray

from elastic.config import RunConfig
from elastic.errors import ConfigError

_OWN_LOCAL: str | None = None
"""The GCS address of the local cluster elastic started in this process (None: none)."""
_OUR_AUTH_MODE: str | None = None
"""The RAY_AUTH_MODE this module set (to match a cluster), so that it is not taken for the user's."""


def local_size(run: RunConfig) -> int:
    """Logical CPUs of a local cluster for this run: enough for the largest group and its spares
    (the point of a laptop run is to exercise the real thing, not to refuse it)."""
    sc = run.scaling
    assert sc.max_workers is not None
    return max(os.cpu_count() or 1, math.ceil((sc.max_workers + sc.spares) * sc.cpus_per_worker - 1e-9))


def minimum(run: RunConfig) -> dict[str, float]:
    """What the smallest group the run accepts needs from the cluster."""
    return {k: v * run.scaling.min_workers for k, v in run.scaling.resources_per_worker.items() if v > 0}


def shortfall(total: dict[str, float], need: dict[str, float]) -> str | None:
    """'CPU: 2 of 4' for each resource the cluster lacks (None when it has them all)."""
    short = [f"{k}: {total.get(k, 0):g} of {v:g}" for k, v in need.items() if total.get(k, 0) + 1e-9 < v]
    return ", ".join(short) or None


def _token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.exists(path)


def cluster_auth(address: str, timeout_s: float = 5.0) -> str | None:
    """How the Ray cluster at `address` (host:port of its GCS) authenticates: "token" when its GCS
    refuses a call without a token, "disabled" when it answers; None for an address Ray resolves
    itself (auto, ray://). ConfigError (one line) when nothing answers there."""
    if "://" in address or ":" not in address:
        return None
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return "token"
            raise ConfigError(f"cannot reach the Ray cluster at {address} ({exc.code().name}): check --address "
                              "(or RAY_ADDRESS) and that the cluster is up") from None
    return "disabled"


def _match_auth_mode(address: str) -> None:
    """Set RAY_AUTH_MODE to what the cluster uses (unless the user set it: then a mismatch is one
    line naming the fix)."""
    global _OUR_AUTH_MODE
    mode = cluster_auth(address)
    chosen = os.environ.get("RAY_AUTH_MODE")
    if chosen is not None and chosen != _OUR_AUTH_MODE:
        if mode is not None and (chosen.lower() == "token") != (mode == "token"):
            raise ConfigError(f"RAY_AUTH_MODE={chosen} is set, but the Ray cluster at {address} "
                              f"{'uses' if mode == 'token' else 'does not use'} token authentication: "
                              f"{'set RAY_AUTH_MODE=token' if mode == 'token' else 'unset RAY_AUTH_MODE'}")
        return
    if mode == "token" and not _token_available():
        raise ConfigError(f"the Ray cluster at {address} uses token authentication and this machine has no "
                          "token: copy the cluster's token to ~/.ray/auth_token or set RAY_AUTH_TOKEN")
    if mode is not None:
        os.environ["RAY_AUTH_MODE"] = _OUR_AUTH_MODE = mode


def connection_problem() -> str | None:
    """Why this driver cannot talk to its cluster (unreachable, or authenticating the wrong way),
    or None when it can: asked when a call to the cluster failed, before blaming an actor."""
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception as exc:  # noqa: BLE001 - not connected at all
        return f"not connected to Ray ({type(exc).__name__})"
    try:
        mode = cluster_auth(address, timeout_s=3.0)
    except ConfigError as exc:
        return str(exc)
    ours = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and ours is not None and (ours.lower() == "token") != (mode == "token"):
        return (f"this driver uses RAY_AUTH_MODE={ours} but the Ray cluster at {address} "
                f"{'uses' if mode == 'token' else 'does not use'} token authentication: its GCS drops the "
                f"driver; {'set RAY_AUTH_MODE=token' if mode == 'token' else 'unset RAY_AUTH_MODE'}")
    return None


def _start_local(run: RunConfig) -> None:
    global _OWN_LOCAL
    ray.init(address="local", num_cpus=local_size(run), include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}})
    _OWN_LOCAL = ray.get_runtime_context().gcs_address


def ensure_ray(address: str | None, run: RunConfig) -> str:
    """Connect this process to the cluster the run trains on; returns which one, in words.
    ConfigError (one line) when that cluster cannot place the run's smallest group."""
    global _OWN_LOCAL
    need = minimum(run)
    if ray.is_initialized():
        total = dict(ray.cluster_resources())
        ours = _OWN_LOCAL is not None and ray.get_runtime_context().gcs_address == _OWN_LOCAL
        if ours and (shortfall(total, need) or total.get("CPU", 0) < local_size(run)):
            ray.shutdown()  # ours and too small for this run: a fresh one sized for it
            _OWN_LOCAL = None
            _start_local(run)
            return "a new local Ray cluster"
        if (short := shortfall(total, need)) is not None:
            raise ConfigError(f"the Ray cluster this process is connected to cannot place {run.scaling.min_workers} "
                              f"workers ({short} needed): lower --min-workers or call ray.shutdown() first")
        return "the Ray cluster this process is connected to"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        _start_local(run)
        return "a local Ray cluster"
    _match_auth_mode(address)
    # No capacity check here: an autoscaling cluster adds nodes for what the run asks (the
    # supervisor says what it cannot place, and waits within the run's bounds).
    ray.init(address=address, log_to_driver=True)
    _OWN_LOCAL = None
    return f"the Ray cluster at {address}"
