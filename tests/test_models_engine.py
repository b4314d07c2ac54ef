"""Model builders and engine pieces that need no process group."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from dist_tempnet.config import load_config
from dist_tempnet.models.clip import build_clip_model, encode_images, encode_texts
from dist_tempnet.models.common import make_scalar_params_1d
from dist_tempnet.models.lm import build_causal_lm, count_parameters
from dist_tempnet.runtime.engine import deepspeed_config, lr_lambda
from dist_tempnet.tasks.base import default_param_groups
from tests._dist import run_distributed


def test_scalar_params_become_1d():
    m = nn.Module()
    m.scale = nn.Parameter(torch.tensor(2.0))
    m.lin = nn.Linear(2, 2)
    assert make_scalar_params_1d(m) == ["scale"]
    assert m.scale.shape == (1,) and float(m.scale) == 2.0


def test_clip_tiny_has_no_0dim_params_and_encodes():
    model = build_clip_model(
        "clip_tiny", vocab_size=50, special_ids={"pad_token_id": 0, "eos_token_id": 3}, max_text_len=16
    )
    assert all(p.dim() > 0 for p in model.parameters())
    ids = torch.randint(4, 50, (3, 16))
    ids[:, 7] = 3
    assert encode_images(model, torch.randn(3, 3, 32, 32)).shape == (3, 64)
    assert encode_texts(model, ids, torch.ones_like(ids)).shape == (3, 64)


def test_vit_b32_parameter_count():
    with torch.device("meta"):
        model = build_clip_model("clip_vit_b32")
    assert sum(p.numel() for p in model.parameters()) == 151_277_313


def test_lm_presets_parameter_counts():
    assert count_parameters("llama2_7b") == 6_738_415_616
    assert count_parameters("llama_1b") == 1_235_814_400


def test_tiny_lm_head_is_tied_and_biasless():
    lm = build_causal_lm("llama_tiny", vocab_size=64)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert getattr(lm.get_output_embeddings(), "bias", None) is None


def test_param_groups_and_schedule():
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"])
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = {g.name: g for g in default_param_groups(model, 0.1)}
    assert len(groups["model"].params) == 1 and len(groups["model_no_decay"].params) == 3
    f = lr_lambda(cfg)
    assert f(0) == 0.1 and f(9) == 1.0 and abs(f(10) - 1.0) < 1e-9 and abs(f(100) - 0.1) < 1e-9


def test_tempnet_freeze_holds_only_the_tempnet_group():
    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10", "loss.tempnet_freeze_steps=30"])
    model, tempnet = lr_lambda(cfg, "model"), lr_lambda(cfg, "tempnet")
    assert [tempnet(s) for s in (0, 29)] == [0.0, 0.0] and model(0) == 0.1 and model(29) > 0
    assert tempnet(30) == model(30) > 0 and tempnet(99) == model(99)


def _frozen_tempnet_worker(rank: int, world: int) -> dict:
    """A DeepSpeed engine over a linear encoder + CLIPTempNet with loss.tempnet_freeze_steps=2: each
    step's group lrs, then τ of fixed features and the encoder's weight after the step."""
    from dist_tempnet.runtime.engine import build_engine, group_lrs
    from dist_tempnet.tasks.base import ParamGroup
    from dist_tempnet.tempnet import CLIPTempNet

    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed wants it even with a process group (a spawned child)
    torch.manual_seed(0)
    overrides = ["train.steps=4", "train.warmup_steps=0", "train.global_batch_size=8", "ray.num_workers=1"]
    overrides += ["train.micro_batch_size=8", "loss.tempnet_lr=0.1", "loss.tempnet_freeze_steps=2"]
    cfg = load_config(None, overrides)
    module = nn.Module()
    module.encoder, module.tempnet = nn.Linear(8, 8), CLIPTempNet(8, num_prototypes=4)
    module.forward = lambda x: module.tempnet(nn.functional.normalize(module.encoder(x), dim=-1))
    groups = [
        ParamGroup("model", list(module.encoder.parameters())),
        ParamGroup("tempnet", list(module.tempnet.parameters()), lr=cfg.loss.tempnet_lr),
    ]
    engine = build_engine(module, groups, cfg)
    x = torch.randn(8, 8)
    probe = nn.functional.normalize(torch.randn(8, 8), dim=-1)  # fixed features: τ moves only with TempNet
    with torch.no_grad():
        out = {"tau": [module.tempnet(probe).clone()], "weight": [module.encoder.weight.clone()], "lrs": []}
    for _ in range(4):
        out["lrs"].append(group_lrs(engine))
        engine.backward((engine(x) * torch.linspace(-1, 1, 8)).sum())  # some τ pushed up, some down
        engine.step()
        with torch.no_grad():
            out["tau"].append(module.tempnet(probe).clone())
            out["weight"].append(module.encoder.weight.clone())
    return out


@pytest.mark.multiproc
def test_tempnet_freeze_keeps_tau_in_a_real_engine():
    out = run_distributed(_frozen_tempnet_worker, 1, timeout=180)[0]
    lrs, tau, weight = out["lrs"], out["tau"], out["weight"]
    # Steps 1 and 2 run with TempNet's lr at 0: τ keeps its initial value while the encoder learns.
    assert [r["tempnet"] for r in lrs[:2]] == [0.0, 0.0] and lrs[0]["model"] > 0
    assert torch.equal(tau[0], tau[1]) and torch.equal(tau[1], tau[2])
    assert not torch.equal(weight[0], weight[1]) and not torch.equal(weight[1], weight[2])
    # From step 3 on TempNet learns at its own lr.
    assert lrs[2]["tempnet"] > 0 and not torch.equal(tau[2], tau[3])


def test_deepspeed_config_accumulation_and_zero3():
    cfg = load_config(None, ["deepspeed.zero_stage=3", "train.precision=bf16"])
    ds = deepspeed_config(cfg, world_size=1)
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_presets_are_not_mutated_by_builds():
    from dist_tempnet.models.clip import clip_config

    clip_config("clip_tiny", image_size=64, vocab_size=10)
    assert clip_config("clip_tiny").vision_config.image_size == 32
