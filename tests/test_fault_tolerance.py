"""Fault tolerance through Ray Train (CPU, gloo, DeepSpeed ZeRO-2, tiny CLIP with iSogCLR + TempNet).

One local Ray serves the module. A reference run trains without faults; a second run with the
same seed loses a worker (SIGKILL after step 5) and then crashes inside the save of step 6: Ray
restarts the workers twice from the step-4 checkpoint and the job finishes by itself with the same
weights, TempNet and DRO state as the reference, having trained on every sample of the epoch
exactly once. Then `dist-tempnet train --no-ray --resume <MLflow run id>` continues that run on one
worker (elastic 2 → 1), in the same MLflow run, and its checkpoint exports.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dist_tempnet.config import load_config
from tests._checkpoints import assert_same_final_state

pytestmark = pytest.mark.slow

NUM_TRAIN = 128  # 8 steps of 16 = one epoch
KILL_STEP, CRASH_STEP = 5, 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dist_tempnet.data import make_demo_clip_dataset

    d = tmp_path_factory.mktemp("ft")
    make_demo_clip_dataset(d / "data", num_train=NUM_TRAIN, num_eval=16, image_size=16, samples_per_shard=16)
    old = Path.cwd()
    os.chdir(d)
    yield d
    os.chdir(old)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    yield
    if ray.is_initialized():
        ray.shutdown()


def overrides(workdir: Path, name: str) -> list[str]:
    return [
        f"run.name={name}",
        "run.seed=0",
        f"data.path={workdir / 'data'}",
        "data.demo=false",
        "data.image_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=32",
        "loss.name=isogclr_tempnet",
        "deepspeed.zero_stage=2",
        "ray.num_workers=2",
        "ray.max_failures=3",
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        "train.steps=8",
        "train.warmup_steps=1",
        "train.log_every=1",
        "checkpoint.every=2",
        "eval.max_batches=1",
        "eval.zero_shot=false",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
    ]


def _run(workdir: Path, name: str, fault: str = ""):
    from dist_tempnet.driver.launcher import run_training

    env = {"DIST_TEMPNET_SEEN_IDS": str(workdir / f"seen-{name}")}
    if fault:
        env["DIST_TEMPNET_FAULT"] = fault
    os.environ.update(env)
    try:
        return run_training(load_config(None, overrides(workdir, name)))
    finally:
        for key in env:
            os.environ.pop(key, None)


@pytest.fixture(scope="module")
def runs(ray_session, workdir):
    t0 = time.perf_counter()
    reference = _run(workdir, "reference")
    t1 = time.perf_counter()
    once = workdir / "fault-once"
    faulted = _run(
        workdir, "faulted", f"kill_rank=1,step={KILL_STEP},crash_in_save_step={CRASH_STEP},once_file={once}"
    )
    t2 = time.perf_counter()
    print(f"\nreference run {t1 - t0:.1f}s, faulted run {t2 - t1:.1f}s")
    return reference, faulted


def test_killed_worker_and_crashed_save_resume_to_the_same_result(workdir, runs):
    reference, faulted = runs
    assert Path(faulted.checkpoint).name == "step_00000008"
    assert_same_final_state(Path(reference.checkpoint), Path(faulted.checkpoint))

    from dist_tempnet.runtime.faults import seen_batches, seen_ids_by_epoch

    seen = seen_ids_by_epoch(workdir / "seen-faulted")
    assert sorted(seen[0]) == list(range(NUM_TRAIN)), "a sample of the epoch was skipped or trained twice"
    # Not only the same set: the same micro batch at every (step, rank), in the same order.
    assert seen_batches(workdir / "seen-faulted") == seen_batches(workdir / "seen-reference")


def test_failures_are_logged_in_the_same_mlflow_run(workdir, runs):
    from mlflow.tracking import MlflowClient

    from dist_tempnet.runtime.checkpoint import checkpoint_bytes

    _, faulted = runs
    client = MlflowClient(tracking_uri=faulted.tracking_uri)
    run = client.get_run(faulted.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["resume_count"] == 2 and run.data.tags["resume_kind"] == "restart"
    assert "restarted after a failure" in run.data.tags["last_failure"]
    assert [m.value for m in client.get_metric_history(faulted.run_id, "resumed_from_step")] == [4, 4]
    loss_steps = sorted({m.step for m in client.get_metric_history(faulted.run_id, "batch/loss")})
    assert loss_steps == list(range(1, 9))  # metrics continue at the right step
    resumed = sorted(
        m.value for m in client.get_metric_history(faulted.run_id, "first_step_after_resume_unix")
    )
    killed = json.loads((workdir / "fault-once.kill.rank1").read_text())["fired_unix"]
    crashed = json.loads((workdir / "fault-once.crash_in_save.rank0").read_text())["fired_unix"]
    size = checkpoint_bytes(Path(faulted.checkpoint))

    def spread(metric: str) -> str:
        values = [m.value for m in client.get_metric_history(faulted.run_id, metric)]
        return f"{min(values):.2f}–{max(values):.2f}s"

    print(
        f"\nkill → training resumed {resumed[0] - killed:.1f}s, crash in save → resumed "
        f"{resumed[1] - crashed:.1f}s; checkpoint {size / 2**20:.2f} MiB, save {spread('checkpoint_save_s')} "
        f"(write {spread('checkpoint_write_s')}, upload {spread('checkpoint_upload_s')}, "
        f"wait for Ray to register {spread('checkpoint_registered_wait_s')})"
    )
    assert 0 < resumed[0] - killed < 300


def test_manual_resume_trains_longer_on_one_worker_and_exports(workdir, runs):
    """`dist-tempnet train --resume <MLflow run id> train.steps=10 ray.num_workers=1`: elastic
    2 → 1 under Ray, the same MLflow run continues, and the new checkpoint exports."""
    from mlflow.tracking import MlflowClient

    from dist_tempnet.commands.cli import main
    from dist_tempnet.runtime.export import export_checkpoint, load_tempnets

    _, faulted = runs
    argv = ["train", "--resume", faulted.run_id, "train.steps=10", "ray.num_workers=1"]
    assert main(argv + [f"mlflow.tracking_uri={faulted.tracking_uri}"]) == 0
    client = MlflowClient(tracking_uri=faulted.tracking_uri)
    run = client.get_run(faulted.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["resume_count"] == 3
    assert run.data.tags["resume_kind"] == "manual" and run.data.metrics["resume_world_size"] == 1
    assert max(m.step for m in client.get_metric_history(faulted.run_id, "batch/loss")) == 10
    checkpoint = Path(run.data.tags["checkpoint_uri"])
    assert checkpoint.name == "step_00000010" and checkpoint.parent.name == "faulted-resume1"
    exported = export_checkpoint(checkpoint, workdir / "export")
    assert (exported / "config.json").is_file() and set(load_tempnets(exported)) == {"image", "text"}
