"""Connecting to a Ray cluster by address (issue 25 item 10): RAY_AUTH_MODE follows what the
cluster's GCS does, never a token file that happens to be on this machine; an address that does not
answer is one line (exit 2), and a driver cut off from its cluster is not reported as a dead
supervisor. The GCS here is a stand-in gRPC server answering the one call elastic asks it."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from elastic._internal import cluster
from elastic.config import RunConfig
from elastic.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


def _gcs(token_auth: bool):
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    class NodeInfo(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
        def GetClusterId(self, request, context):  # noqa: N802 - gRPC's name
            if token_auth and not any(k == "authorization" for k, _ in context.invocation_metadata()):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing")
            return gcs_service_pb2.GetClusterIdReply()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(NodeInfo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A token on this machine (what any earlier local Ray run leaves in ~/.ray), no mode chosen."""
    token = tmp_path / "auth_token"
    token.write_text("a" * 32)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "_OUR_AUTH_MODE", None)
    inits: list[dict] = []
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kw: inits.append({**kw, "mode": cluster.os.environ.get("RAY_AUTH_MODE")}))
    return inits


@pytest.mark.parametrize("token_auth,mode", [(False, "disabled"), (True, "token")])
def test_the_auth_mode_follows_the_cluster_not_the_token_file(env, token_auth, mode):
    server, address = _gcs(token_auth)
    try:
        cluster.ensure_ray(address, RunConfig())
        assert env == [{"address": address, "log_to_driver": True, "mode": mode}]
    finally:
        server.stop(0)


def test_a_mode_the_user_set_that_the_cluster_does_not_use_is_one_line(env, monkeypatch):
    server, address = _gcs(token_auth=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    try:
        with pytest.raises(ConfigError, match="does not use token authentication: unset RAY_AUTH_MODE"):
            cluster.ensure_ray(address, RunConfig())
        assert env == []
        # A driver already cut off that way is told so, not that its supervisor died.
        monkeypatch.setattr(cluster.ray, "get_runtime_context", lambda: type("C", (), {"gcs_address": address})())
        assert "does not use token authentication" in (cluster.connection_problem() or "")
    finally:
        server.stop(0)


def test_an_address_that_does_not_answer_is_one_line_exit_2(tmp_path, env, capsys):
    from elastic.cli import main

    code = main(["run", "tests/jobs.py:train", "--checkpoint-uri", str(tmp_path / "run"), "--address",
                 "127.0.0.1:1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: ") == 1 and "cannot reach the Ray cluster at 127.0.0.1:1" in err, err
    assert env == []


@pytest.mark.slow  # a real cluster without token auth (the unit tests above cover the decision)
@pytest.mark.timeout(240)
def test_a_run_on_a_cluster_without_token_auth_while_a_token_is_on_this_machine(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from ray.cluster_utils import Cluster

    token = tmp_path / "auth_token"
    token.write_text("b" * 32)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the cluster's choice, not the driver's
    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_TOKEN_PATH": str(token)}
        env.pop("RAY_AUTH_MODE")
        p = subprocess.run([sys.executable, "-m", "elastic.cli", "run", "tests/jobs.py:train", "--checkpoint-uri",
                            str(tmp_path / "run"), "--address", c.address, "--config", "steps=3", "--quiet"],
                           capture_output=True, text=True, timeout=180, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
    finally:
        c.shutdown()
