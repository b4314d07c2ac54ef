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


def _readout_attention(net, features):
    """A CLIPTempNet readout's attention over its prototypes for these features ([N, M])."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        x = torch.sigmoid(net.proj(features))
        p = x @ F.normalize(net.prototypes, dim=-1).t()
        return torch.softmax(p / net.readout.log_scale.exp(), dim=-1)


def _entropy_ratio(attn):
    """H(attention)/log M, averaged over the inputs (1 = uniform)."""
    import math

    entropy = -(attn * attn.clamp_min(1e-30).log()).sum(-1).mean()
    return float(entropy) / math.log(attn.shape[-1])


def test_clip_readout_starts_at_the_papers_temperature_and_is_not_uniform():
    """The paper's CLIP TempNet starts its readout softmax at temperature 0.01 (its `scaler` is
    log 0.01); at temperature 1 the attention over 256 prototypes is uniform to 1%, so only the
    readout's bias learns and every τ moves alike (README, "Why τ did not move")."""
    import math

    import torch
    import torch.nn.functional as F

    from dist_tempnet import CLIPTempNet, LMTempNet

    torch.manual_seed(0)
    features = F.normalize(torch.randn(512, 64), dim=-1)
    net = CLIPTempNet(64)
    assert net.readout.log_scale.item() == pytest.approx(math.log(0.01))
    attn = _readout_attention(net, features)
    assert _entropy_ratio(attn) < 0.5
    flat = CLIPTempNet(64, readout_temperature=1.0)
    assert _entropy_ratio(_readout_attention(flat, features)) > 0.95
    # The LM TempNet's readout starts at 1, as in the paper's LM code.
    assert LMTempNet(32, hidden_size=8).readout.log_scale.item() == 0.0
    with pytest.raises(ValueError, match="readout temperature"):
        CLIPTempNet(64, readout_temperature=0.0)


def test_readout_temperature_from_the_config_reaches_both_tasks_tempnets(tmp_path):
    """`loss.tempnet_readout_temperature` reaches the CLIP loss's two TempNets and the LM's TempNet;
    unset, each keeps the paper's default."""
    import math

    from dist_tempnet.tasks.base import readout_temperature
    from dist_tempnet.tasks.clip import loss_kwargs

    clip = load_config(REPO / "configs" / "clip_tiny_longtail.yaml")
    assert clip.loss.tempnet_readout_temperature is None and readout_temperature(clip.loss) == {}
    set_ = load_config(
        REPO / "configs" / "clip_tiny_longtail.yaml", ["loss.tempnet_readout_temperature=0.05"]
    )
    kwargs = loss_kwargs(set_, embed_dim=16)
    assert kwargs["readout_temperature"] == 0.05
    from dist_tempnet.losses.contrastive import build_contrastive_loss

    loss = build_contrastive_loss("isogclr_tempnet", 8, **kwargs)
    for net in (loss.image_tempnet, loss.text_tempnet):
        assert net.readout.log_scale.item() == pytest.approx(math.log(0.05))
