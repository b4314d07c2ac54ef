"""TempNet made visible in a CLIP run: τ health while training, τ against class frequency after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_tempnet.config import load_config
from tests._dist import run_distributed

REPO = Path(__file__).resolve().parents[1]


def _clip_worker(rank: int, world: int, tmp: str):
    from dist_tempnet.data.prepare import prepare_data
    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.trainer import Trainer

    cfg = load_config(
        REPO / "configs" / "clip_tiny_tempnet.yaml",
        [
            f"data.path={tmp}/lt",
            "data.demo_class_zipf=1.0",
            "data.demo_num_train=72",
            "data.demo_num_eval=36",
            "data.image_size=16",
            "ray.num_workers=1",
            "train.global_batch_size=24",
            "train.micro_batch_size=24",
            "train.steps=3",
            "train.log_every=1",
            "train.warmup_steps=0",
            "loss.tempnet_lr=0",  # a TempNet that cannot learn: its τ never moves
            "loss.tempnet_freeze_steps=0",
            "mlflow.enabled=false",
        ],
    )
    prepare_data(cfg)
    trainer = Trainer(cfg, None, LocalSink(Path(tmp) / "ckpt", keep_last=1))
    return trainer.fit(), sorted(trainer.tau_health.warned)


@pytest.mark.multiproc
def test_tau_health_and_tau_against_class_frequency(tmp_path):
    final, warned = run_distributed(_clip_worker, 1, str(tmp_path), timeout=300)[0]
    # Per step: τ spread and the share of samples on each bound, per side.
    for side in ("image", "text"):
        for q in ("p10", "p50", "p90", "at_min", "at_max"):
            assert f"tau/{side}_{q}" in final
    # The frozen TempNet is flagged after warm-up, once per side.
    assert warned == [("tau/image", "still"), ("tau/text", "still")]
    # At evaluation: tail-class accuracy, held-out τ spread and its rank correlation with class
    # frequency (TempNet), and the same correlation over the last trained samples.
    assert 0.0 <= final["eval/zero_shot_acc_tail"] <= 1.0
    assert final["eval/tau_image_p10"] <= final["eval/tau_image_p90"]
    for key in ("eval/tau_freq_spearman_image", "eval/tau_freq_spearman_text"):
        assert -1.0 <= final[key] <= 1.0, key
    for key in ("train_tau/freq_spearman_image", "train_tau/freq_spearman_text"):
        assert -1.0 <= final[key] <= 1.0, key


def test_tau_health_waits_for_the_frozen_tempnet():
    """A TempNet held frozen on purpose (loss.tempnet_freeze_steps) is not "still" during the freeze."""
    from dist_tempnet.runtime.trainer import tau_settling_steps

    tempnet = load_config(REPO / "configs" / "clip_tiny_tempnet.yaml")
    assert tempnet.loss.tempnet_freeze_steps > 0
    assert tau_settling_steps(tempnet) == tempnet.train.warmup_steps + tempnet.loss.tempnet_freeze_steps
    isogclr = load_config(REPO / "configs" / "clip_tiny_tempnet.yaml", ["loss.name=isogclr"])
    assert tau_settling_steps(isogclr) == isogclr.train.warmup_steps  # no TempNet: nothing frozen
