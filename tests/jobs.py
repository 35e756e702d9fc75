"""Training functions used by the integration tests: the reference job, and a variant whose
checkpoints do not fit it."""

from __future__ import annotations

from elastic.chaos.job import IN_DIM, N_SAMPLES, make_data, make_model, train  # noqa: F401


def train_other_model(config: dict) -> None:
    """Same loop, different layer sizes: its checkpoints must not load into `train`'s model."""
    train({**config, "width": 8})
