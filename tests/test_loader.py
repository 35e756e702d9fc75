"""ctx.data_loader: a real torch DataLoader (worker processes, prefetching) over elastic's batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch.utils.data import TensorDataset

from elastic.errors import ConfigError
from elastic.sampler import ElasticBatchSampler, ElasticSampler
from elastic._internal.waiting import wait_until
from elastic._internal.worker.loader import make_loader

pytestmark = pytest.mark.timeout(60)


def _data(n: int = 200) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.arange(n))


def test_a_loader_rebuilt_after_a_resize_continues_at_the_exact_sample():
    """World 2 for steps 0-4, then world 3 from step 5 (a new generation builds a new loader): each
    step's shares are disjoint and together exactly that step's global batch."""
    sampler = ElasticSampler(num_samples=200, global_batch_size=30, seed=4)
    seen: dict[int, list[int]] = {}
    for world, start, stop in ((2, 0, 5), (3, 5, 12)):
        for rank in range(world):
            for i, idx in enumerate(ElasticBatchSampler(sampler, start_step=start, rank=rank, world_size=world,
                                                        steps=stop)):
                seen.setdefault(start + i, []).extend(idx)
    for step in range(12):
        assert sorted(seen[step]) == sorted(sampler.global_indices(step).tolist()), step
        assert len(set(seen[step])) == 30


def test_worker_processes_yield_the_same_batches_as_indexing_and_leave_the_global_rng_alone():
    ds = _data()
    x, y = ds.tensors
    rng = torch.get_rng_state()
    loader = make_loader(ds, global_batch_size=24, start_step=7, rank=1, world_size=3, seed=9, steps=15,
                         num_workers=2, prefetch_factor=2)
    it = iter(loader)
    assert torch.equal(torch.get_rng_state(), rng), "building the loader drew from the global RNG"
    sampler = ElasticSampler(num_samples=200, global_batch_size=24, seed=9)
    got = list(it)
    assert len(got) == len(loader) == 8
    for step, (xb, yb) in zip(range(7, 15), got):
        idx = sampler.indices(step=step, rank=1, world_size=3)
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
    assert loader.batch_sampler.loss_scale() == 3 / 24


@pytest.mark.parametrize("bad", ["batch_size", "shuffle", "sampler"])
def test_arguments_elastic_owns_are_refused_in_one_line(bad):
    with pytest.raises(ConfigError, match="global_batch_size"):
        make_loader(_data(), global_batch_size=8, start_step=0, rank=0, world_size=1, **{bad: 4})


def test_loader_processes_die_with_their_rank():
    """SIGKILL of the rank's process: its loader processes go at once (PR_SET_PDEATHSIG), not after
    torch's own 5 s watchdog."""
    script = textwrap.dedent("""
        import os, sys, time, torch
        from torch.utils.data import TensorDataset
        from elastic._internal.worker.loader import make_loader
        ds = TensorDataset(torch.randn(100, 3))
        it = iter(make_loader(ds, global_batch_size=10, start_step=0, rank=0, world_size=1, num_workers=2,
                              persistent_workers=True))
        next(it)
        # Both workers must be past their init (a worker still starting when its rank dies is
        # the race die_with_parent's parent check covers; here each has produced a batch).
        next(it)
        print(" ".join(str(w.pid) for w in it._workers), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        assert wait_until(lambda: not any(_alive(p) for p in pids), timeout_s=3.0), "loader processes outlived their rank"
        print(f"loader processes gone {time.monotonic() - t0:.2f}s after their rank")
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_loader_worker_whose_rank_died_before_its_init_goes_at_once():
    """PR_SET_PDEATHSIG set after the parent already died never fires: the init checks the parent."""
    script = "from elastic._internal.worker.loader import die_with_parent; die_with_parent(parent=1); print('survived')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL and "survived" not in proc.stdout
