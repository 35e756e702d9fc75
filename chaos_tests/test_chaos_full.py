"""The full matrix under pytest (deselected by default; `python -m pytest -m chaos_full chaos_tests`)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.chaos_full, pytest.mark.timeout(6 * 3600)]


def test_full_matrix():
    import ray

    from chaos_tests import matrix

    if ray.is_initialized():
        ray.shutdown()
    assert matrix.main([]) == 0
