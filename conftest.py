"""Root conftest: the costly cases the default run leaves out (selected with -m, e.g. `-m slow`)."""

from __future__ import annotations

import pytest

# marker -> why it is not in the default run (CI runs the default; see README, Tests).
OPT_IN = {
    "slow": "a costlier variant of a case the default run covers: run with -m slow",
    "chaos_full": "full chaos matrix: run with -m chaos_full or python -m chaos_tests.matrix",
}


def pytest_collection_modifyitems(config, items):
    chosen = config.getoption("-m") or ""
    for marker, reason in OPT_IN.items():
        if marker in chosen:
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
