"""DeepSpeed engine construction: ZeRO stage, precision, named parameter groups, per-group LR.

DeepSpeed's WarmupLR/WarmupDecayLR force one `warmup_max_lr` on every group (which would give
TempNet the model's lr), so the schedule is a torch LambdaLR that scales each group's own lr.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from dist_tempnet.config import Config
from dist_tempnet.tasks.base import ParamGroup


def lr_lambda(cfg: Config, group: str = ""):
    """Linear warmup then cosine decay to min_lr_ratio (or constant), as a multiplier.

    The `tempnet` group is held at 0 for the first loss.tempnet_freeze_steps steps: τ keeps its
    initial value while the encoders' features are still noise (it would only learn to fall).
    """
    t = cfg.train
    frozen = cfg.loss.tempnet_freeze_steps if group == "tempnet" else 0

    def factor(step: int) -> float:
        if step < frozen:
            return 0.0
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a run; `load_universal` for an engine that will load a universal
    checkpoint (a resume on another number of workers, see runtime.checkpoint.restore)."""
    t, ds = cfg.train, cfg.deepspeed
    grad_accum = t.global_batch_size // (world_size * t.micro_batch_size)
    if grad_accum * world_size * t.micro_batch_size != t.global_batch_size:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by world size {world_size} × "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero["contiguous_gradients"] = True
        if ds.overlap_comm is not None:  # else DeepSpeed decides: on for ZeRO-3
            zero["overlap_comm"] = ds.overlap_comm
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    conf: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        # Our optimizer is a plain torch AdamW (per-group lr); DeepSpeed wraps it under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        conf["checkpoint"] = {"load_universal": True}
    if t.precision == "bf16" and ds.zero_stage >= 1:
        # bf16 gradients lose low bits when summed over micro-batches and ranks: accumulate and
        # reduce them in fp32, as DeepSpeed recommends for bf16. (Without ZeRO, DeepSpeed 0.19.8
        # refuses a bf16 model with fp32 accumulation, so stage 0 keeps its bf16 DDP path.)
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
        conf["communication_data_type"] = "fp32"
    conf.update(ds.extra)
    return conf


def build_optimizer(groups: list[ParamGroup], cfg: Config) -> torch.optim.Optimizer:
    torch_groups = [
        {
            "params": g.params,
            "lr": cfg.train.lr if g.lr is None else g.lr,
            "weight_decay": cfg.train.weight_decay if g.weight_decay is None else g.weight_decay,
            "name": g.name,
        }
        for g in groups
        if g.params
    ]
    # fused AdamW on CUDA: one kernel per step instead of one per tensor (offload is refused in config).
    fused = torch.cuda.is_available() or None
    return torch.optim.AdamW(torch_groups, betas=tuple(cfg.train.betas), fused=fused)


def build_engine(model: nn.Module, groups: list[ParamGroup], cfg: Config, load_universal: bool = False):
    """Wrap `model` in a DeepSpeed engine; torch.distributed must already be initialized."""
    import deepspeed

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    optimizer = build_optimizer(groups, cfg)
    # One schedule per group (LambdaLR takes a list): TempNet's may hold it frozen at the start.
    schedules = [lr_lambda(cfg, group.get("name", "")) for group in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, load_universal),
        dist_init_required=False,
    )
    return engine


def group_lrs(engine) -> dict[str, float]:
    """Current lr of each named group (names survive DeepSpeed's optimizer wrapping)."""
    opt = engine.optimizer
    groups = getattr(opt, "param_groups", None) or opt.optimizer.param_groups
    return {g.get("name", f"group{i}"): float(g["lr"]) for i, g in enumerate(groups)}
