"""Test-wide hygiene: no test may leave environment variables behind for the next one.

Tests that build a Trainer in-process call `init_distributed`, which (like torchrun) fills RANK,
WORLD_SIZE and MASTER_PORT with setdefault. Left in os.environ, that port is inherited by every later
subprocess that starts its own world of one, long after the port was given back: EADDRINUSE.
"""

import os

import pytest

# Ray's own poll intervals, shorter for the tests. Both are Ray settings read from the environment by
# every Ray process started from here (local instances, `ray start` nodes, subprocess jobs):
# - Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s):
#   every checkpoint save waits for that poll (RaySink waits until its report is collected), and a
#   finished run or a dead worker is only noticed then.
# - the GCS declares a node dead after RAY_health_check_failure_threshold (5) failed checks
#   RAY_health_check_period_ms (3000) apart: 15 s after a node is lost (test_multinode.py). A check
#   fails at once on a dead node but only after RAY_health_check_timeout_ms (10 s) on a slow one, so
#   a loaded machine is not mistaken for a lost node.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_health_check_period_ms", "500")


@pytest.fixture(autouse=True)
def _restore_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# Modules whose tests join a multi-node Ray cluster from this process. They run first: after this
# process has started (and shut down) a local Ray, Ray Train V2's controller on a newly joined cluster
# is cancelled before it starts ("The actor never ran"), which a fresh process never sees.
JOIN_A_CLUSTER_FIRST = ("test_multinode.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in JOIN_A_CLUSTER_FIRST)
