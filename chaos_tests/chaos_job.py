"""The chaos suite's training function: the package's reference job (elastic/chaos/job.py).

A file of its own so that `elastic run chaos_tests/chaos_job.py:train` runs it in a driver subprocess.
"""

from elastic.chaos.job import IN_DIM, N_SAMPLES, make_data, make_model, train  # noqa: F401
