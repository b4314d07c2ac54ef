"""Checkpoints on an object store: a real S3-compatible server (moto) on 127.0.0.1.

The tiny CLIP job (2 Ray workers, ZeRO-2, TempNet + iSogCLR) writes its checkpoints only to
`s3://ckpt/runs/ray/...` and loses a worker after step 3: Ray restarts it from the step-2
checkpoint in the bucket and it finishes by itself. Then `train --resume <MLflow run id>` (its
`checkpoint_uri` tag is an s3:// URI), `eval --checkpoint s3://…` and `export --checkpoint s3://…`
work from the bucket. An unreachable store fails before any worker starts, and never becomes a local
folder named `s3:`.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from dist_tempnet.config import load_config
from dist_tempnet.runtime.storage import StorageError

BUCKET = "ckpt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* variables point at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    yield client
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dist_tempnet.data import make_demo_clip_dataset

    d = tmp_path_factory.mktemp("s3")
    make_demo_clip_dataset(d / "data", num_train=64, num_eval=16, image_size=16, samples_per_shard=16)
    old = Path.cwd()
    os.chdir(d)
    yield d
    os.chdir(old)


def overrides(workdir: Path, name: str, output_dir: str) -> list[str]:
    return [
        f"run.name={name}",
        "run.seed=0",
        f"run.output_dir={output_dir}",
        f"data.path={workdir / 'data'}",
        "data.demo=false",
        "data.image_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "loss.name=isogclr_tempnet",
        "deepspeed.zero_stage=2",
        "ray.num_workers=2",
        "ray.max_failures=2",
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.log_every=1",
        "checkpoint.every=2",
        "eval.max_batches=1",
        "eval.zero_shot=false",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


def test_unreachable_store_is_a_clear_error_before_workers_and_no_local_folder(s3, workdir, monkeypatch):
    from dist_tempnet.driver.launcher import run_training

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    cfg = load_config(None, overrides(workdir, "unreachable", f"s3://{BUCKET}/runs"))
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=r"run.output_dir='s3://ckpt/runs'.*cannot write.*127\.0\.0\.1"):
        run_training(cfg)
    assert time.perf_counter() - t0 < 60
    assert cfg.run.output_dir == f"s3://{BUCKET}/runs"  # not absolutized into a local path
    assert not (workdir / "s3:").exists() and not list(workdir.glob("s3*"))

    import ray

    assert not ray.is_initialized(), "Ray (and so workers) started before the store was checked"


@pytest.mark.slow
def test_killed_worker_resume_eval_export_with_checkpoints_only_in_the_bucket(s3, workdir):
    import ray
    from mlflow.tracking import MlflowClient

    from dist_tempnet.commands.cli import main
    from dist_tempnet.driver.launcher import run_training
    from dist_tempnet.runtime.export import load_tempnets

    os.environ["DS_ACCELERATOR"] = "cpu"
    # Started here (after the AWS_* variables are set, which every Ray process inherits); no dashboard.
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    output = f"s3://{BUCKET}/runs"
    os.environ["DIST_TEMPNET_FAULT"] = f"kill_rank=1,step=3,once_file={workdir / 'once'}"
    try:
        summary = run_training(load_config(None, overrides(workdir, "bucketed", output)))
    finally:
        os.environ.pop("DIST_TEMPNET_FAULT", None)
    try:
        assert summary.checkpoint == f"s3://{BUCKET}/runs/ray/bucketed/step_00000004"
        keys = _keys(s3, "runs/ray/bucketed/")
        assert "runs/ray/bucketed/step_00000004/COMPLETE" in keys
        assert any(k.startswith("runs/ray/bucketed/step_00000004/deepspeed/") for k in keys)
        assert not (workdir / "s3:").exists() and not (workdir / "runs").exists()

        client = MlflowClient(tracking_uri=summary.tracking_uri)
        run = client.get_run(summary.run_id)
        assert run.data.metrics["resume_count"] == 1 and run.data.tags["resume_kind"] == "restart"
        assert [m.value for m in client.get_metric_history(summary.run_id, "resumed_from_step")] == [2]
        assert run.data.tags["checkpoint_uri"] == summary.checkpoint

        # --resume <MLflow run id> → its s3:// checkpoint_uri; the new checkpoints go to the bucket too.
        argv = ["train", "--resume", summary.run_id, "train.steps=6", "ray.num_workers=1"]
        assert main(argv + [f"mlflow.tracking_uri={summary.tracking_uri}"]) == 0
        run = client.get_run(summary.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["resume_kind"] == "manual"
        resumed = run.data.tags["checkpoint_uri"]
        assert resumed == f"s3://{BUCKET}/runs/ray/bucketed-resume1/step_00000006"
        assert max(m.step for m in client.get_metric_history(summary.run_id, "batch/loss")) == 6
    finally:
        ray.shutdown()

    # eval and export straight from the bucket (a run directory: its newest complete checkpoint).
    assert main(["eval", "--checkpoint", f"s3://{BUCKET}/runs/ray/bucketed", "--json", "eval.json"]) == 0
    import json

    assert json.loads(Path("eval.json").read_text())["step"] == 4
    assert main(["export", "--checkpoint", resumed, "--out", str(workdir / "export")]) == 0
    assert (workdir / "export" / "config.json").is_file()
    assert set(load_tempnets(workdir / "export")) == {"image", "text"}
    assert main(["eval", "--checkpoint", f"s3://{BUCKET}/runs/ray/nothing-here"]) == 2
