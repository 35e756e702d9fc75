"""Unit: configuration validation and the elastic sampler."""

from __future__ import annotations

import pytest
import torch

import elastic
from elastic.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def test_scaling_defaults_and_validation():
    s = elastic.ScalingConfig(min_workers=2)
    assert s.max_workers == 2 and s.resources_per_worker == {"CPU": 1.0}
    with pytest.raises(ConfigError, match="min_workers .3. > max_workers .2."):
        elastic.ScalingConfig(min_workers=3, max_workers=2)
    with pytest.raises(ConfigError):
        elastic.ScalingConfig(min_workers=0)
    with pytest.raises(ConfigError):
        elastic.ScalingConfig(spares=-1)
    assert elastic.ScalingConfig(gpus_per_worker=1).resources_per_worker == {"CPU": 1.0, "GPU": 1}


def test_configs_are_frozen():
    s = elastic.ScalingConfig()
    with pytest.raises(Exception):
        s.min_workers = 5  # type: ignore[misc]


@pytest.mark.parametrize("kwargs", [{"every_n_steps": -1}, {"keep_last": -1}, {"when_busy": "later"},
                                    {"commit_timeout_s": float("inf")}])
def test_checkpoint_config_validation(kwargs):
    with pytest.raises(ConfigError):
        elastic.CheckpointConfig(**kwargs)


def test_keep_last_zero_keeps_all_in_the_config_and_the_checkpointer():
    from elastic._internal.checkpoint import Checkpointer

    assert elastic.CheckpointConfig(keep_last=0).keep_last == 0
    assert Checkpointer("memory://keep-all", keep_last=0).keep_last == 0


def test_failure_config_budget_and_backoff():
    f = elastic.FailureConfig(max_failures=2, backoff_base_s=0.5, backoff_max_s=3)
    assert f.failures_left(2) and not f.failures_left(3)
    assert elastic.FailureConfig(max_failures=-1).failures_left(10**6)
    assert [f.backoff_s(n) for n in range(5)] == [0.0, 0.5, 1.0, 2.0, 3.0]
    with pytest.raises(ConfigError):
        elastic.FailureConfig(collective_timeout_s=0)
    with pytest.raises(ConfigError):
        elastic.FailureConfig(max_failures=-2)


@pytest.mark.parametrize("step", [0, 1, 7, 30, 123])
def test_sampler_global_batch_is_world_size_independent(step):
    s = elastic.ElasticSampler(num_samples=1000, global_batch_size=64, seed=5)
    batch = s.global_indices(step)
    for world in (1, 2, 3, 4):
        shares = [s.indices(step=step, rank=r, world_size=world) for r in range(world)]
        merged = torch.cat(shares)
        assert torch.equal(merged, batch)  # same samples, same order
        assert len(set(merged.tolist())) == 64  # disjoint shares
        sizes = [len(x) for x in shares]
        assert max(sizes) - min(sizes) <= 1


def test_sampler_is_stateless_and_epochs_cover_data():
    a = elastic.ElasticSampler(num_samples=100, global_batch_size=10, seed=1)
    b = elastic.ElasticSampler(num_samples=100, global_batch_size=10, seed=1)
    assert torch.equal(a.global_indices(37), b.global_indices(37))  # no history needed
    epoch0 = torch.cat([a.global_indices(s) for s in range(10)])
    assert sorted(epoch0.tolist()) == list(range(100))
    assert not torch.equal(a.global_indices(0), a.global_indices(10))  # reshuffled next epoch
    assert not torch.equal(a.global_indices(0), elastic.ElasticSampler(num_samples=100, global_batch_size=10,
                                                                       seed=2).global_indices(0))


def test_sampler_loss_scale_makes_average_the_global_mean():
    # Per-sample "losses" v: each rank sums its share and scales it; DDP then averages over ranks.
    s = elastic.ElasticSampler(num_samples=100, global_batch_size=12, seed=0)
    v = torch.rand(100, dtype=torch.float64)
    target = v[s.global_indices(3)].mean().item()
    for world in (1, 2, 3, 5):
        per_rank = [v[s.indices(step=3, rank=r, world_size=world)].sum().item() * s.loss_scale(world)
                    for r in range(world)]
        assert abs(sum(per_rank) / world - target) < 1e-12


def test_sampler_bad_input():
    with pytest.raises(ConfigError):
        elastic.ElasticSampler(num_samples=10, global_batch_size=20)
    with pytest.raises(ConfigError):
        elastic.ElasticSampler(num_samples=0, global_batch_size=1)
    with pytest.raises(ValueError):
        elastic.ElasticSampler(num_samples=10, global_batch_size=2).indices(step=0, rank=2, world_size=2)
