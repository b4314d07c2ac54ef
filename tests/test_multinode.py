"""A multi-node Ray cluster on one machine (Ray's own `ray.cluster_utils.Cluster`: a head with no
CPUs plus two worker nodes, each its own raylet), running the tiny CLIP job (ZeRO-2, iSogCLR +
TempNet) with `ray.placement_strategy=STRICT_SPREAD`: its two workers report the node ids of the two
worker nodes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dist_tempnet.config import load_config

pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dist_tempnet.data import make_demo_clip_dataset

    d = tmp_path_factory.mktemp("multinode")
    make_demo_clip_dataset(d / "data", num_train=96, num_eval=16, image_size=16, samples_per_shard=16)
    old = Path.cwd()
    os.chdir(d)
    yield d
    os.chdir(old)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # A replacement node on a loaded 2-core machine takes longer than Ray Train's default 60 s wait.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "600"
    # The head runs Ray Train's controller only (no CPU): the workers must go to worker nodes.
    head = {"num_cpus": 0, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=head)
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def overrides(workdir: Path, name: str, address: str) -> list[str]:
    return [
        f"run.name={name}",
        "run.seed=0",
        f"data.path={workdir / 'data'}",
        "data.demo=false",
        "data.image_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "loss.name=isogclr_tempnet",
        "deepspeed.zero_stage=2",
        f"ray.address={address}",
        "ray.num_workers=2",
        "ray.placement_strategy=STRICT_SPREAD",
        "ray.max_failures=2",
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        f"train.steps={STEPS}",
        "train.warmup_steps=1",
        "train.log_every=1",
        f"checkpoint.every={EVERY}",
        "checkpoint.keep_last=5",
        "eval.max_batches=1",
        "eval.zero_shot=false",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


def test_workers_spread_over_the_two_worker_nodes(workdir, cluster):
    from mlflow.tracking import MlflowClient

    from dist_tempnet.driver.launcher import run_training

    c, (node_a, node_b) = cluster
    summary = run_training(load_config(None, overrides(workdir, "spread", c.address)))
    assert Path(summary.checkpoint).name == f"step_{STEPS:08d}"
    placed = MlflowClient(tracking_uri=summary.tracking_uri).get_run(summary.run_id).data.tags["ray_node_ids"]
    assert sorted(placed.split(",")) == sorted([node_a.node_id, node_b.node_id]), f"not spread: {placed}"
