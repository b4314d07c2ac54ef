"""What a CUDA/bf16 run would get, pinned on CPU (DESIGN §10): DeepSpeed config, fp32 TempNet math
under a bf16 engine, offload refusal, no host syncs in the hot loop."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from dist_tempnet.config import ConfigError, load_config
from dist_tempnet.runtime.engine import deepspeed_config
from dist_tempnet.tempnet import CLIPTempNet, LMTempNet
from tests._dist import run_distributed

NO_DATA = "data.path=/nonexistent/dist_tempnet_gpu_test"
ONE = ["ray.num_workers=1", "train.micro_batch_size=4", "train.global_batch_size=4", NO_DATA]


def _ds_config(overrides: list[str]) -> dict:
    return deepspeed_config(load_config(None, ONE + overrides), world_size=1)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_and_reduces_gradients_in_fp32(stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    conf = _ds_config(["train.precision=bf16", f"deepspeed.zero_stage={stage}"])
    assert conf["data_types"]["grad_accum_dtype"] == "fp32"
    assert conf["communication_data_type"] == "fp32"
    # DeepSpeed 0.19.8 reads the keys where we put them (a misspelt key would be ignored silently).
    parsed = DeepSpeedConfig(conf)
    assert parsed.grad_accum_dtype == "fp32" and parsed.communication_data_type == torch.float32
    # fp32 runs need none of it.
    assert "data_types" not in _ds_config(["train.precision=fp32", f"deepspeed.zero_stage={stage}"])


def test_overlap_comm_follows_deepspeed_default_on_zero3():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z3 = DeepSpeedZeroConfig(**_ds_config(["deepspeed.zero_stage=3"])["zero_optimization"])
    z2 = DeepSpeedZeroConfig(**_ds_config(["deepspeed.zero_stage=2"])["zero_optimization"])
    assert z3.overlap_comm is True and z2.overlap_comm is False
    forced = _ds_config(["deepspeed.zero_stage=3", "deepspeed.overlap_comm=false"])
    assert forced["zero_optimization"]["overlap_comm"] is False


# -- TempNet under a bf16 engine -----------------------------------------------------------------


class _TauModule(nn.Module):
    """A bf16 'backbone' (one Linear) plus both TempNets, wrapped by a real DeepSpeed bf16 engine."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(16, 16)
        self.clip_tempnet = CLIPTempNet(16, num_prototypes=32, tau_min=0.005, tau_max=0.05)
        self.lm_tempnet = LMTempNet(16, hidden_size=32, tau_min=0.01, tau_max=1.5, dropout=0.0)

    def forward(self, x: torch.Tensor):
        feats = nn.functional.normalize(self.backbone(x.to(self.backbone.weight.dtype)).float(), dim=-1)
        tau = self.clip_tempnet(feats)
        return (feats.sum(-1) * tau).mean() + tau.mean(), tau


def _bf16_engine_tau(rank: int, world: int) -> dict:
    from dist_tempnet.runtime.engine import build_engine
    from dist_tempnet.tasks.base import ParamGroup

    os.environ["LOCAL_RANK"] = str(rank)
    cfg = load_config(None, ONE + ["train.precision=bf16", "deepspeed.zero_stage=2"])
    module = _TauModule()
    tempnet = [*module.clip_tempnet.parameters(), *module.lm_tempnet.parameters()]
    groups = [ParamGroup("model", list(module.backbone.parameters())), ParamGroup("tempnet", tempnet)]
    engine = build_engine(module, groups, cfg)
    # Distinct inputs whose τ differ by less than bf16's spacing near τ (≈1e-4 at 0.03; at init τ sits
    # near its midpoint, DESIGN §11): an fp32 TempNet tells them apart, a bf16 one returns a handful
    # of values.
    gen = torch.Generator().manual_seed(1)
    feats = nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=-1)
    logits = torch.randn(64, 16, generator=gen)
    with torch.no_grad():
        clip_tau = engine.module.clip_tempnet(feats.bfloat16())
        lm_tau = engine.module.lm_tempnet(logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = engine.module.clip_tempnet(feats)
    loss, _ = engine(torch.randn(4, 16))
    engine.backward(loss)
    engine.step()
    return {
        "param_dtype": engine.module.backbone.weight.dtype,
        "clip_tau": clip_tau,
        "lm_tau": lm_tau,
        "autocast_tau": under_autocast,
        "loss_finite": bool(torch.isfinite(loss)),
    }


@pytest.mark.slow
def test_tempnet_math_is_fp32_under_a_bf16_engine():
    (out,) = run_distributed(_bf16_engine_tau, 1, timeout=240)
    assert out["param_dtype"] == torch.bfloat16  # the engine really is bf16
    for key in ("clip_tau", "lm_tau", "autocast_tau"):
        tau = out[key]
        assert tau.dtype == torch.float32, key
        # Not quantized: (almost) every input gets its own τ.
        assert torch.unique(tau).numel() >= 48, (key, torch.unique(tau).numel())
    assert out["loss_finite"]


def test_optimizer_offload_is_refused_before_workers_start():
    with pytest.raises(ConfigError, match="deepspeed.offload_optimizer: true is not supported.*CPU Adam"):
        load_config(None, ONE + ["deepspeed.offload_optimizer=true"])
