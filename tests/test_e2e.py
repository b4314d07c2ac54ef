"""End-to-end: the real job through Ray Train + DeepSpeed ZeRO + MLflow on tiny models (CPU).

One local Ray instance serves every test of this module (starting Ray costs ~20 s here).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dist_tempnet.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = [
    "train.steps=6",
    "train.log_every=2",
    "data.demo_num_train=512",
    "data.demo_num_eval=128",
    "eval.max_batches=1",
    "ray.num_workers=2",
    "train.warmup_steps=2",
]
TINY_LM = [
    "train.steps=4",
    "train.log_every=2",
    "ray.num_workers=2",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "eval.max_batches=2",
    "train.warmup_steps=1",
    "data.seq_len=64",
]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    old = Path.cwd()
    os.chdir(d)
    yield d
    os.chdir(old)


def _run(config: str | None, overrides: list[str]):
    from dist_tempnet.driver.launcher import run_training

    cfg = load_config(config, overrides)
    return cfg, run_training(cfg)


def _mlflow_run(summary):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary.tracking_uri)
    return client, client.get_run(summary.run_id)


@pytest.mark.parametrize("zero_stage, loss", [(2, "clip"), (3, "isogclr_tempnet")])
def test_clip_job_through_ray_deepspeed_mlflow(ray_session, workdir, zero_stage, loss):
    cfg, summary = _run(
        None,
        TINY_CLIP
        + [f"deepspeed.zero_stage={zero_stage}", f"loss.name={loss}", f"run.name=e2e-clip-z{zero_stage}"],
    )
    client, run = _mlflow_run(summary)
    assert run.info.status == "FINISHED"
    assert run.data.tags["zero_stage"] == str(zero_stage) and run.data.tags["world_size"] == "2"
    assert run.data.tags["method"] == loss and len(run.data.tags["git_commit"]) > 0
    assert run.data.params["train.steps"] == "6"
    history = client.get_metric_history(summary.run_id, "batch/loss")
    assert [m.step for m in history] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(m.value)) for m in history)
    assert "eval/zero_shot_acc" in run.data.metrics and "throughput/samples_per_s" in run.data.metrics
    ckpt = Path(run.data.tags["checkpoint_uri"])
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "rank_0.pt").is_file() and (ckpt / "rank_1.pt").is_file()
    assert (ckpt / "deepspeed").is_dir()
    if loss == "isogclr_tempnet":
        assert (
            "train/tau/image_mean" in run.data.metrics
            and "train/loss_internals/log_u_image_mean" in run.data.metrics
        )
        rank0 = torch.load(ckpt / "rank_0.pt", weights_only=False)
        assert "dro_state" in rank0["task"]
        artifacts = {a.path for a in client.list_artifacts(summary.run_id)}
        assert "tau_histogram.png" in artifacts and "config.yaml" in artifacts


def _lm_export(workdir: Path, summary, name: str) -> Path:
    from dist_tempnet.runtime.export import export_checkpoint

    return export_checkpoint(summary.checkpoint, workdir / "exports" / name)


def test_lm_three_modes_export_generate(ray_session, workdir):
    from dist_tempnet.commands.generate import generate_text, load_for_generation
    from dist_tempnet.runtime.export import load_tempnets

    _, scratch = _run(str(REPO / "configs" / "lm_tiny_scratch.yaml"), TINY_LM + ["run.name=e2e-lm-scratch"])
    client, run = _mlflow_run(scratch)
    assert run.info.status == "FINISHED" and run.data.tags["zero_stage"] == "3"
    assert {"eval/ppl", "eval/ppl_tempnet", "eval/token_acc", "tau/mean"} <= set(run.data.metrics)
    export = _lm_export(workdir, scratch, "scratch")
    assert (export / "config.json").is_file() and (export / "tempnet.safetensors").is_file()
    # The CLI export logs the exported model to the training run (small: as an artifact).
    from dist_tempnet.commands.cli import main as cli_main

    logged = workdir / "exports" / "scratch-cli"
    assert (
        cli_main(
            [
                "export",
                "--checkpoint",
                scratch.checkpoint,
                "--out",
                str(logged),
                "--log-to-mlflow",
                "--tracking-uri",
                scratch.tracking_uri,
            ]
        )
        == 0
    )
    run = client.get_run(scratch.run_id)
    assert run.data.tags["export_uri"] == str(logged.resolve())
    assert any(a.path == "export" for a in client.list_artifacts(scratch.run_id))

    _, finetune = _run(
        str(REPO / "configs" / "lm_tiny_finetune.yaml"),
        TINY_LM + ["run.name=e2e-lm-finetune", f"model.pretrained={export}"],
    )
    assert _mlflow_run(finetune)[1].info.status == "FINISHED"

    _, frozen = _run(
        str(REPO / "configs" / "lm_tiny_tempnet_only.yaml"),
        TINY_LM + ["run.name=e2e-lm-frozen", f"model.pretrained={export}"],
    )
    assert _mlflow_run(frozen)[1].info.status == "FINISHED"
    frozen_export = _lm_export(workdir, frozen, "frozen")
    # The frozen LM is bit-identical to the one it started from; its TempNet was trained.
    from safetensors.torch import load_file

    before, after = (
        load_file(str(export / "model.safetensors")),
        load_file(str(frozen_export / "model.safetensors")),
    )
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    t0 = load_tempnets(export)["lm"].state_dict()
    t1 = load_tempnets(frozen_export)["lm"].state_dict()
    assert any(not torch.equal(t0[k], t1[k]) for k in t0)

    model, tokenizer, tempnet = load_for_generation(frozen_export)
    text, tokens, taus = generate_text(model, tokenizer, tempnet, "The", max_new_tokens=8)
    assert len(taus) == len(tokens) == 8
    assert all(tempnet.tau_min <= t <= tempnet.tau_max for t in taus)
    assert len(set(round(t, 6) for t in taus)) > 1, "TempNet should give different tokens different τ"
