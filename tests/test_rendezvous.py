"""Unit: the rendezvous store listens on the node's address only, under an unguessable prefix."""

from __future__ import annotations

import socket
import subprocess

import pytest

from elastic.supervisor.actor import bind_store, new_store_prefix

pytestmark = pytest.mark.timeout(30)


def _other_address() -> str | None:
    """An address of this machine other than loopback (None when it has none)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return next((a for a in out if ":" not in a and not a.startswith("127.")), None)


def test_the_store_listens_on_the_given_address_only():
    store, sock = bind_store("127.0.0.1", 5.0)
    port = store.port
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the node's address: reachable
    other = _other_address()
    if other is None:
        pytest.skip("this machine has no address besides loopback to try")
    with pytest.raises(OSError):
        socket.create_connection((other, port), timeout=2)  # any other interface: refused
    del store, sock


def test_every_run_gets_a_fresh_unguessable_prefix():
    prefixes = {new_store_prefix() for _ in range(3)}
    assert len(prefixes) == 3 and all(len(p) == 33 and p.endswith("/") for p in prefixes)  # 128 random bits
