"""Model builders and engine pieces that need no process group."""

from __future__ import annotations

import torch
from torch import nn

from dist_tempnet.config import load_config
from dist_tempnet.models.clip import build_clip_model, encode_images, encode_texts
from dist_tempnet.models.common import make_scalar_params_1d
from dist_tempnet.models.lm import build_causal_lm, count_parameters
from dist_tempnet.runtime.engine import deepspeed_config, lr_lambda
from dist_tempnet.tasks.base import default_param_groups


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


def test_deepspeed_config_accumulation_and_zero3():
    cfg = load_config(None, ["deepspeed.zero_stage=3", "train.precision=bf16"])
    ds = deepspeed_config(cfg, world_size=1)
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_presets_are_not_mutated_by_builds():
    from dist_tempnet.models.clip import clip_config

    clip_config("clip_tiny", image_size=64, vocab_size=10)
    assert clip_config("clip_tiny").vision_config.image_size == 32
