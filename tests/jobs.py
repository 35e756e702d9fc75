"""Training functions used by the integration tests: the reference job, and a variant whose
checkpoints do not fit it."""

from __future__ import annotations

import os

from elastic.chaos.job import IN_DIM, N_SAMPLES, make_data, make_model, train  # noqa: F401


def train_other_model(config: dict) -> None:
    """Same loop, different layer sizes: its checkpoints must not load into `train`'s model."""
    train({**config, "width": 8})


def train_noting_priority(config: dict) -> None:
    """Same loop; first notes this rank's nice value as a file `<generation>-<rank>-<nice>`."""
    import elastic

    ctx = elastic.get_context()
    open(os.path.join(config["nice_dir"], f"{ctx.generation}-{ctx.rank}-{os.getpriority(os.PRIO_PROCESS, 0)}"), "w").close()
    train(config)
