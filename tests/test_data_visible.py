"""Corrupt data the run skipped (data.allow_corrupt) shows in MLflow: counts and a warning."""

from __future__ import annotations

from pathlib import Path

from dist_tempnet.config import load_config
from dist_tempnet.data import make_demo_clip_dataset
from tests._dist import run_distributed


def _train(rank: int, world: int, data: str, root: str, uri: str, run_id: str) -> dict:
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"
    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.spec import WorkerSpec
    from dist_tempnet.runtime.trainer import Trainer

    cfg = load_config(None, [
        f"data.path={data}", "data.demo=false", "data.image_size=16", "data.shuffle_buffer=0",
        "data.allow_corrupt=true", "data.warn_skipped_fraction=0.05", "loss.name=clip",
        "ray.num_workers=1", "train.global_batch_size=16", "train.micro_batch_size=16", "train.steps=7",
        "train.log_every=1", "eval.max_batches=1", "eval.zero_shot=false", f"run.output_dir={root}",
    ])  # fmt: skip
    trainer = Trainer(
        cfg, WorkerSpec(cfg.to_dict(), tracking_uri=uri, mlflow_run_id=run_id), LocalSink(Path(root), 1)
    )
    return trainer.fit()


def test_skipped_samples_and_shards_reach_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    data = make_demo_clip_dataset(
        tmp_path / "clip", num_train=128, num_eval=16, image_size=16, samples_per_shard=16
    )
    for index in (1, 4):  # two of eight shards lose their second half: ~12 % of the split
        shard = data / "train" / f"train-{index:06d}.tar"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("data")).info.run_id
    run_distributed(_train, 1, str(data), str(tmp_path / "runs"), uri, run_id, timeout=600)
    samples = client.get_metric_history(run_id, "train/data/skipped_samples")
    shards = client.get_metric_history(run_id, "train/data/skipped_shards")
    last = max(samples, key=lambda m: m.step)
    assert max(m.value for m in shards) >= 2, "both truncated shards are counted"
    assert last.value >= 2 * 6, "each truncated shard loses its unread half, not one sample"
    warning = client.get_run(run_id).data.tags["data_warning"]
    assert "skipped as corrupt" in warning and "data.warn_skipped_fraction=0.05" in warning
