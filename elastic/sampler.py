"""ElasticSampler: which samples each rank trains on at each step.

The global batch of step s is a pure function of (seed, step): the same set of sample indices
whatever the world size, so a run's math depends on the world size only through the order in
which gradients are summed. Each rank takes a contiguous share of that batch. Nothing is stored:
resuming needs only the step.
"""

from __future__ import annotations

import torch

from elastic.errors import ConfigError


class ElasticSampler:
    def __init__(self, *, num_samples: int, global_batch_size: int, seed: int = 0, drop_last: bool = True):
        if num_samples <= 0:
            raise ConfigError(f"num_samples must be > 0, got {num_samples}")
        if global_batch_size <= 0:
            raise ConfigError(f"global_batch_size must be > 0, got {global_batch_size}")
        if global_batch_size > num_samples:
            raise ConfigError(
                f"global_batch_size ({global_batch_size}) exceeds num_samples ({num_samples}): "
                "lower the batch size"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        # drop_last: an epoch is the whole batches that fit; the tail is reshuffled next epoch.
        self.steps_per_epoch = num_samples // global_batch_size if drop_last else -(-num_samples // global_batch_size)
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        # One generator per epoch, seeded from (seed, epoch): independent of history and world size.
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_samples, generator=gen)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        """The sample indices of step's whole global batch (same for every world size)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        perm = self._permutation(self.epoch(step))
        start = (step % self.steps_per_epoch) * self.global_batch_size
        return perm[start : start + self.global_batch_size]

    def indices(self, *, step: int, rank: int, world_size: int) -> torch.Tensor:
        """This rank's share of step's global batch: contiguous, disjoint, covering, sizes differ by ≤ 1."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        batch = self.global_indices(step)
        n = len(batch)
        lo = rank * n // world_size
        hi = (rank + 1) * n // world_size
        return batch[lo:hi]

    def loss_scale(self, world_size: int) -> float:
        """Multiply a per-rank *summed* loss by this so that DDP's gradient average equals the
        mean-loss gradient of the whole global batch, whatever the world size."""
        return world_size / self.global_batch_size


class ElasticBatchSampler:
    """This rank's share of each step's global batch, as a `torch.utils.data.DataLoader`
    `batch_sampler`: yields one list of indices per step, from `start_step` (the restored
    `state.step`) up to `steps` (forever when None). A loader rebuilt after a resize, at the step
    the group restored, continues at the exact sample: what a step trains on is a function of
    (seed, step) only.
    """

    def __init__(self, sampler: ElasticSampler, *, start_step: int, rank: int, world_size: int,
                 steps: int | None = None):
        if start_step < 0:
            raise ConfigError(f"start_step must be >= 0, got {start_step}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.sampler = sampler
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        self.steps = steps

    def __iter__(self):  # type: ignore[no-untyped-def]
        step = self.start_step
        while self.steps is None or step < self.steps:
            yield self.sampler.indices(step=step, rank=self.rank, world_size=self.world_size).tolist()
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an ElasticBatchSampler without `steps` is endless")
        return max(0, self.steps - self.start_step)

    def loss_scale(self, world_size: int | None = None) -> float:
        """ElasticSampler.loss_scale at this sampler's world size (or the one given)."""
        return self.sampler.loss_scale(world_size or self.world_size)
