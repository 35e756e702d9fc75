"""Fixtures and helpers shared by the storage and checkpoint tests.

`ckpt_uri` runs a test over memory://, file:// and s3:// (moto's server on 127.0.0.1, reached by
s3fs through AWS_ENDPOINT_URL with fake credentials). Import with
`from storage_fixtures import *` style imports; not a conftest (tests/conftest.py is the runtime's).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE1234",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretKey/DoNotLeak/1234567890abcdefgh",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "elastic-test"


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """A real S3 endpoint on loopback with one bucket; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*FAKE_AWS, "AWS_ENDPOINT_URL"]}
    os.environ.update(FAKE_AWS)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    try:
        fs.mkdir(BUCKET)
    except FileExistsError:
        pass  # moto's backends are per process: a second module's server sees the first one's bucket
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(params=["memory", "file", "s3"])
def ckpt_uri(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A fresh, empty run location on each backend."""
    name = f"run-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        uri = f"memory://{name}"
        yield uri
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{name}"):
            fs.rm(f"/{name}", recursive=True)
    elif request.param == "file":
        yield f"file://{tmp_path}/{name}"
    else:
        request.getfixturevalue("moto_s3")
        yield f"s3://{BUCKET}/{name}"


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 8, generator=g)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()


def make_state(seed: int = 0, optim: str = "adam", steps: int = 1) -> dict[str, Any]:
    """A state as the runtime builds it: model + optimizer (FQN keys) + step + extra."""
    model = make_model(seed)
    opt: torch.optim.Optimizer
    if optim == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(steps):
        train_step(model, opt, seed=seed * 100 + i)
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": steps, "extra": {"epoch": 1, "tag": "x"}}


def assert_state_equal(a: Any, b: Any, path: str = "") -> None:
    """Nested equality with torch.equal for tensors (tuples and lists compare as sequences)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)
