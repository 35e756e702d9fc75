"""Multi-rank checkpoints with real gloo process groups of 2 and 3 ranks in spawned processes.

Covers: 2 ranks save (Adam, async) -> 3 ranks load and 3 ranks save (SGD momentum) -> 2 ranks
load, with torch.equal round trips; async save holds the values at save time although training
modifies tensors right after save() returns; host buffers are reused; a corrupted shard is named
by verify and load falls back; SIGKILL of a rank after its shard is staged leaves no committed
checkpoint and the survivor's wait() returns after cancel_pending() or its commit timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from elastic._internal import tree
from elastic._internal.checkpoint import Checkpointer, CheckpointStore
from elastic._internal.checkpoint.faulty_fs import Fault, FaultyFileSystem

try:
    from storage_fixtures import assert_state_equal, make_state
except ImportError:  # tests/ imported as a package
    from tests.storage_fixtures import assert_state_equal, make_state

pytestmark = pytest.mark.timeout(120)


# -- harness ---------------------------------------------------------------------------------
def _child(fn: Callable[..., Any], rank: int, ws: int, port: int, args: tuple, q: Any) -> None:
    try:
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        dist.init_process_group(
            "gloo", store=dist.PrefixStore("gen0/pg", store), rank=rank, world_size=ws,
            timeout=timedelta(seconds=20),
        )  # fmt: skip
        ckpt_store = dist.PrefixStore("gen0/ckpt", store)
        q.put((rank, "ok", fn(rank, ws, dist.group.WORLD, ckpt_store, store, *args)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()  # flush the result through the pipe before the hard exit
        os._exit(0)  # skip gloo teardown: a dead peer must not hang our exit


def run_world(
    fn: Callable[..., Any], ws: int, *args: Any, timeout_s: float = 60.0,
    while_running: Callable[[dist.TCPStore, list[Any]], None] | None = None,
) -> dict[int, Any]:  # fmt: skip
    """Run fn(rank, ws, pg, ckpt_store, raw_store, *args) on `ws` spawned ranks; results by rank."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=30))  # fmt: skip
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, ws, store.port, args, q)) for r in range(ws)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        if while_running is not None:
            while_running(store, procs)
        deadline = time.monotonic() + timeout_s
        expected = {r for r, p in enumerate(procs) if p.exitcode != -signal.SIGKILL}
        while set(results) < expected:
            left = deadline - time.monotonic()
            assert left > 0, f"ranks {sorted(expected - set(results))} did not finish in time"
            try:
                rank, status, value = q.get(timeout=min(left, 1.0))
            except Exception:  # noqa: BLE001 - queue.Empty: re-check liveness
                expected = {r for r, p in enumerate(procs) if p.exitcode != -signal.SIGKILL}
                dead = [r for r in expected - set(results) if procs[r].exitcode is not None]
                if dead and q.empty():
                    time.sleep(0.5)  # a result may still be in flight through the pipe
                    if q.empty():
                        codes = {r: procs[r].exitcode for r in dead}
                        raise AssertionError(f"ranks exited without a result: {codes}")
                continue
            assert status == "ok", f"rank {rank} failed:\n{value}"
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return results


# -- rank functions (module level: spawn pickles them by name) -------------------------------
def _save_two_steps(rank: int, ws: int, pg: Any, store: Any, raw: Any, uri: str) -> dict:
    ck = Checkpointer(uri, async_save=True, keep_last=3)
    state = make_state(seed=1, optim="adam", steps=1)
    committed: list[Any] = []
    ck.save(state, step=10, rank=rank, world_size=ws, pg=pg, store=store,
            on_commit=committed.append)  # fmt: skip
    for _, t in tree.tensor_leaves(state):  # "training" changes the tensors while the write runs
        t.add_(1.0)
    info = ck.wait(timeout_s=30)
    allocs = ck.buffers.allocations
    ck.save(state, step=20, rank=rank, world_size=ws, pg=pg, store=store)
    info20 = ck.wait(timeout_s=30)
    return {"info10": info, "info20": info20, "allocs": (allocs, ck.buffers.allocations),
            "committed": committed}  # fmt: skip


def _load_then_save(rank: int, ws: int, pg: Any, store: Any, raw: Any, uri: str, uri2: str) -> dict:
    fresh = make_state(seed=9, optim="adam", steps=1)
    info = Checkpointer(uri).load(fresh)
    assert_state_equal(make_state(seed=1, optim="adam", steps=1), fresh)
    sgd = make_state(seed=2, optim="sgd", steps=2)
    Checkpointer(uri2, async_save=False).save(sgd, step=5, rank=rank, world_size=ws, pg=pg,
                                              store=store)  # fmt: skip
    return {"info": info}


def _load_sgd(rank: int, ws: int, pg: Any, store: Any, raw: Any, uri2: str) -> dict:
    fresh = make_state(seed=8, optim="sgd", steps=1)
    info = Checkpointer(uri2).load(fresh)
    assert_state_equal(make_state(seed=2, optim="sgd", steps=2), fresh)
    return {"info": info}


@pytest.mark.timeout(150)
def test_reshard_round_trips_and_fallback(tmp_path: Any) -> None:
    uri, uri2 = f"file://{tmp_path}/a", f"file://{tmp_path}/b"
    res = run_world(_save_two_steps, 2, uri)
    for r in (0, 1):
        assert res[r]["info10"].step == 10 and res[r]["info20"].step == 20
        assert res[r]["allocs"][0] == res[r]["allocs"][1]  # buffers reused, not reallocated
    assert [i.step for i in res[0]["committed"]] == [10] and res[1]["committed"] == []
    cs = CheckpointStore(uri)
    manifest = cs.read_manifest(20)
    assert manifest.world_size == 2
    assert {f.rank for n, f in manifest.files.items() if n.endswith(".distcp")} == {0, 1}
    victim = next(n for n, f in manifest.files.items() if f.rank == 1 and n.endswith(".distcp"))
    path = f"{cs.step_path(20)}/{victim}"
    data = bytearray(cs.fs.cat_file(path))
    data[-50] ^= 0xFF
    cs.fs.pipe_file(path, bytes(data))
    problems = cs.verify(20)
    assert len(problems) == 1 and victim in problems[0]

    res = run_world(_load_then_save, 3, uri, uri2)  # 2 -> 3, falling back past step 20
    assert all(res[r]["info"].step == 10 and res[r]["info"].skipped == (20,) for r in range(3))
    assert CheckpointStore(uri2).read_manifest(5).world_size == 3

    res = run_world(_load_sgd, 2, uri2)  # 3 -> 2
    assert all(res[r]["info"].step == 5 for r in range(2))


def _save_then_lose_peer(rank: int, ws: int, pg: Any, store: Any, raw: Any, uri: str,
                         mode: str) -> dict:  # fmt: skip
    fs, _ = __import__("elastic._internal.storage", fromlist=["resolve"]).resolve(uri)
    if rank == 1:  # this rank's shard write stalls, so it is killed before the commit
        fs = FaultyFileSystem(fs=fs, faults=[Fault("open_write", kind="latency", latency_s=60)])
    ck = Checkpointer(uri, async_save=True, fs=fs, commit_timeout_s=60 if mode == "cancel" else 2)
    ck.save(make_state(seed=3), step=7, rank=rank, world_size=ws, pg=pg, store=store)
    raw.set(f"staged{rank}", "1")
    if rank == 1:
        time.sleep(120)
    raw.wait(["killed"])
    t0 = time.monotonic()
    if mode == "cancel":
        ck.cancel_pending()
    info = ck.wait(timeout_s=30)
    return {"info": info, "waited": time.monotonic() - t0, "error": ck.last_error}


def _kill_rank1(store: dist.TCPStore, procs: list[Any]) -> None:
    store.wait(["staged0", "staged1"], timedelta(seconds=60))
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].join(timeout=10)
    store.set("killed", "1")


@pytest.mark.parametrize("mode", ["cancel", "timeout"])
def test_killed_rank_means_no_commit(tmp_path: Any, mode: str) -> None:
    uri = f"file://{tmp_path}/k"
    res = run_world(_save_then_lose_peer, 2, uri, mode, while_running=_kill_rank1)
    assert set(res) == {0}
    assert res[0]["info"] is None
    assert res[0]["waited"] < (1.0 if mode == "cancel" else 5.0)
    assert res[0]["error"] == "cancelled" if mode == "cancel" else "durable shard" in res[0]["error"]
    cs = CheckpointStore(uri)
    assert cs.latest() is None
    assert [i.status for i in cs.list()] == ["partial"]
    assert cs.clean_partial() and cs.list() == []
