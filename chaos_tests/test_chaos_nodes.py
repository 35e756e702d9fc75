"""Node loss and gain on a multi-node Ray cluster (ray.cluster_utils.Cluster): shrink, then grow."""

from __future__ import annotations

import os

import pytest

from chaos_tests import harness
from chaos_tests.schedules import Schedule, draw

pytestmark = [pytest.mark.timeout(180), pytest.mark.chaos_full]


@pytest.fixture(scope="module")
def cluster(rules_dir):
    from chaos_tests.conftest import node_cluster

    c, close = node_cluster(3, str(rules_dir))
    yield c
    close()


def test_node_removed_then_added_resizes_and_matches(cluster, rules_dir, tmp_path, chaos_seed):
    plan = draw("node", Schedule.AT_STEP, chaos_seed(31), 3)
    print("plan:", plan.describe())
    job = plan.job(tmp_path)
    ref = harness.reference(tmp_path.parent, job)
    out = harness.run(job, plan.actions, cluster=cluster)
    harness.check(out, ref, exact=False, expect_markers=plan.n_faults)
    sizes = [e["world_size"] for e in out.events if e["event"] == "group_built"]
    assert sizes[0] == 3 and 2 in sizes and sizes[-1] == 3, sizes
