"""Run identity: a new `train` never silently continues another run; `--resume` checks the checkpoint
against the new config before anything starts, stops early with nothing to train, and a failed
resume leaves the original MLflow run's status alone.

Checkpoints here are written by the real LocalSink around a stand-in engine (file shapes of a ZeRO-2
save), so no DeepSpeed engine is needed except in the failed-resume case (which fails loading them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dist_tempnet.commands.cli import main
from dist_tempnet.config import ConfigError, load_config
from dist_tempnet.driver.resume import check_resume, config_for_resume
from dist_tempnet.runtime.checkpoint import LocalSink
from tests.test_checkpoint import _FakeEngine

TINY = [
    "data.demo_num_train=64",
    "data.demo_num_eval=16",
    "data.image_size=16",
    "train.global_batch_size=16",
    "train.micro_batch_size=16",
    "ray.num_workers=1",
    "eval.max_batches=1",
]


def _config(tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            *TINY,
            f"run.output_dir={tmp_path / 'runs'}",
            f"data.path={tmp_path / 'data'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "run.name=job",
            *extra,
        ],
    )


def _checkpoint(root: Path, cfg, step: int, run_id: str = "", world: int = 1) -> Path:
    sink = LocalSink(root, keep_last=5)
    extra = {"mlflow_run_id": run_id, "tracking_uri": cfg.mlflow.tracking_uri}
    path = Path(sink.save(_FakeEngine(), step, {"data": None}, cfg.to_dict(), {"step": step}, extra))
    if world != 1:
        meta = json.loads((path / "meta.json").read_text())
        (path / "meta.json").write_text(json.dumps(meta | {"world_size": world}))
    return path


def _finished_run(cfg) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run_id = client.create_run(client.create_experiment(cfg.mlflow.experiment)).info.run_id
    client.set_terminated(run_id, "FINISHED")
    return client, run_id


@pytest.mark.parametrize("use_ray", [True, False])
def test_new_train_with_an_existing_run_name_stops_before_anything_starts(tmp_path, capsys, use_ray):
    cfg = _config(tmp_path)
    root = tmp_path / "runs" / "ray" / "job" if use_ray else tmp_path / "runs" / "job" / "checkpoints"
    _checkpoint(root, cfg, 4)
    argv = ["train", *TINY, f"run.output_dir={tmp_path / 'runs'}", f"data.path={tmp_path / 'data'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "run.name=job"]  # fmt: skip
    assert main(argv + ([] if use_ray else ["--no-ray"])) == 2
    err = capsys.readouterr().err
    assert "run.name='job' already exists" in err and str(root) in err, err
    assert f"--resume {root}" in err and "another run.name" in err, err
    assert not (tmp_path / "data").exists(), "no data prepared"
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run opened"


def test_resume_checks_the_checkpoint_against_the_new_config(tmp_path):
    cfg = _config(tmp_path)
    ckpt = _checkpoint(tmp_path / "ckpt", cfg, 4, world=2)
    resumed = config_for_resume(
        ckpt, ["deepspeed.zero_stage=3", "loss.name=isogclr_tempnet", "train.lr=1e-4"]
    )
    with pytest.raises(ConfigError) as info:
        check_resume(resumed, ckpt, 2)
    message = str(info.value)
    assert "deepspeed.zero_stage: checkpoint 2, this run 3" in message
    assert "loss.name: checkpoint 'clip', this run 'isogclr_tempnet'" in message
    assert "train.lr" not in message, "optimizer settings may change on resume"
    with pytest.raises(ConfigError, match="model.preset: checkpoint 'clip_tiny', this run 'clip_small'"):
        check_resume(config_for_resume(ckpt, ["model.preset=clip_small"]), ckpt, 2)
    check_resume(config_for_resume(ckpt, ["ray.num_workers=1"]), ckpt, 1)  # elastic resume: fine


def test_resume_past_the_target_step_exits_0_and_leaves_mlflow_alone(tmp_path, capsys):
    cfg = _config(tmp_path)
    client, run_id = _finished_run(cfg)
    before = client.get_run(run_id)
    ckpt = _checkpoint(tmp_path / "ckpt", cfg, 6, run_id)
    assert main(["train", "--resume", str(ckpt), "train.steps=6"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and after.data.tags == before.data.tags
    assert len(client.search_runs([before.info.experiment_id])) == 1, "no new MLflow run"


def test_failed_resume_keeps_the_original_runs_status(tmp_path):
    cfg = _config(tmp_path)
    client, run_id = _finished_run(cfg)
    ckpt = _checkpoint(tmp_path / "ckpt", cfg, 2, run_id)  # stand-in engine files: loading them fails
    assert main(["train", "--no-ray", "--resume", str(ckpt), "train.steps=4"]) == 2
    run = client.get_run(run_id)
    assert run.data.tags["resumed_from_checkpoint"] == str(ckpt), "the run was reopened, then failed"
    assert run.info.status == "FINISHED"
