"""The task contract: what a task plugs into the one training loop (runtime.trainer.Trainer).

A task owns its model (the module DeepSpeed wraps), its parameter groups, its batch stream with an
exact data position, one forward step and its evaluation. `Task` holds what every task shares: the
batch stream and its data-position state, the TempNet parameter group, the hooks most tasks leave
empty. Subclasses set `unit`, build `self.module`, and implement `_open_stream`, `units`, `forward`
and `evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dist_tempnet.config import Config, LossConfig
from dist_tempnet.data.resume import data_position, resume_data_position


@dataclass
class StepResult:
    """What a task's forward returns: the loss to backprop and metrics to log (already global).

    Metrics are 0-dim device tensors (or plain numbers): reading them on the host would stall the
    accelerator's queue every micro-step, so the loop accumulates them and syncs at log_every.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class ParamGroup:
    """A named optimizer group; `lr`/`weight_decay` None mean the train.* defaults."""

    name: str
    params: list[nn.Parameter]
    lr: float | None = None
    weight_decay: float | None = None


def default_param_groups(
    model: nn.Module, weight_decay: float, skip: set[int] | None = None
) -> list[ParamGroup]:
    """Split trainable params into decayed (matrices) and non-decayed (biases, norms, scalars)."""
    skip = skip or set()
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        ParamGroup("model", decay, weight_decay=weight_decay),
        ParamGroup("model_no_decay", no_decay, weight_decay=0.0),
    ]
    return [g for g in groups if g.params]


class Task:
    """Base of every task; see the module docstring for the contract."""

    unit: str = "samples"  # what throughput counts: samples (CLIP) or tokens (LM)
    module: nn.Module

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.train_manifest: Any = None  # set by subclasses: the training split's manifest
        self._stream: Any = None
        self._data_resume: Any = None  # set by load_state: where the resumed data stream starts

    # -- what every task shares ------------------------------------------------------------------

    def tempnet_group(self, params: list[nn.Parameter]) -> list[ParamGroup]:
        """TempNet parameters get their own lr and weight decay (loss.tempnet_lr, ...)."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return []
        lo = self.cfg.loss
        return [ParamGroup("tempnet", params, lr=lo.tempnet_lr, weight_decay=lo.tempnet_weight_decay)]

    def batches(self) -> Iterator[dict[str, Any]]:
        """The training stream of this rank, resumed at the loaded data position if any."""
        self._stream = self._open_stream(self._data_resume)
        return self._stream

    def data_counters(self) -> dict[str, int]:
        """This rank's training-stream counters: samples delivered, and lost to corrupt data."""
        stream = self._stream
        return {
            "samples_seen": int(getattr(stream, "samples_seen", 0)),
            "skipped_samples": int(getattr(stream, "skipped_samples", 0)),
            "skipped_shards": int(getattr(stream, "skipped_shards", 0)),
        }

    def state(self) -> dict[str, Any]:
        """This rank's part of a checkpoint (plain types and tensors only)."""
        return {"data": data_position(self._stream)}

    def load_state(self, states: list[dict[str, Any]], old_world: int) -> None:
        """Take every old rank's `state()` (any old world size) and resume from it."""
        self._data_resume = resume_data_position(
            states, self.train_manifest, self.rank, self.world, self.cfg.data.num_workers
        )

    def after_engine(self, engine) -> None:
        """Called once the DeepSpeed engine exists (e.g. ZeRO-3 external parameters)."""

    def before_step(self, step: int) -> dict[str, float]:
        """Per-step schedules the task owns; returns what to log."""
        return {}

    def tau_samples(self) -> tuple[dict[str, torch.Tensor], str, str]:
        """τ values for the end-of-run histogram: ({label: values}, x label, y label)."""
        return {}, "", ""

    def tau_prefixes(self) -> list[str]:
        """Logged series of per-sample τ in [loss.tau_min, loss.tau_max] whose health the loop watches:
        each prefix P has metrics P_p10, ... P_at_max (tau_stats.stat_key: `tau/` gives tau/p10)."""
        return []

    # -- what each task implements -----------------------------------------------------------------

    def param_groups(self) -> list[ParamGroup]:
        raise NotImplementedError

    def _open_stream(self, resume: Any) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def units(self, batch: dict[str, Any]) -> int:
        raise NotImplementedError

    def forward(self, engine, batch: dict[str, Any]) -> StepResult:
        raise NotImplementedError

    def evaluate(self, engine) -> dict[str, float]:
        raise NotImplementedError


def readout_temperature(loss: LossConfig) -> dict[str, float]:
    """TempNet's readout-temperature keyword, only when the config sets one (else the net's default)."""
    t = loss.tempnet_readout_temperature
    return {} if t is None else {"readout_temperature": t}
