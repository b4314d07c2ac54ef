"""Task plug-ins for the one training loop: each supplies model, batches, loss step and eval."""

from __future__ import annotations

import torch

from dist_tempnet.config import Config


def build_task(cfg: Config, rank: int, world: int, device: torch.device):
    if cfg.run.task == "clip":
        from dist_tempnet.tasks.clip import CLIPTask

        return CLIPTask(cfg, rank, world, device)
    if cfg.run.task == "lm":
        from dist_tempnet.tasks.lm import LMTask

        return LMTask(cfg, rank, world, device)
    raise ValueError(f"run.task: unknown task {cfg.run.task!r}")
