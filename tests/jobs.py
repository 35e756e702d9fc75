"""Training functions used by the integration tests: the reference job, and a variant whose
checkpoints do not fit it."""

from __future__ import annotations

import os

from elastic.chaos.job import IN_DIM, N_SAMPLES, make_data, make_model, train  # noqa: F401


def train_other_model(config: dict) -> None:
    """Same loop, different layer sizes: its checkpoints must not load into `train`'s model."""
    train({**config, "width": 8})


def train_noting_priority(config: dict) -> None:
    """Same loop; first notes this rank's nice value as a file `<generation>-<rank>-<nice>`, and the
    nice value of every supervisor process on this machine as `supervisor-<nice>`."""
    import elastic

    ctx = elastic.get_context()
    notes = [f"{ctx.generation}-{ctx.rank}-{os.getpriority(os.PRIO_PROCESS, 0)}"]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"ray::SupervisorActor"):
                notes.append(f"supervisor-{os.getpriority(os.PRIO_PROCESS, int(pid))}")
        except OSError:  # gone meanwhile
            pass
    for note in notes:
        open(os.path.join(config["nice_dir"], note), "w").close()
    train(config)
