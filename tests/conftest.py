"""Test-wide hygiene: no test may leave environment variables behind for the next one.

Tests that build a Trainer in-process call `init_distributed`, which (like torchrun) fills RANK,
WORLD_SIZE and MASTER_PORT with setdefault. Left in os.environ, that port is inherited by every later
subprocess that starts its own world of one, long after the port was given back: EADDRINUSE.
"""

import os

import pytest


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
