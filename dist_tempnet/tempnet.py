"""TempNet modules: small networks that predict a temperature per input (DESIGN §2.1, §2.2).

Both nets read *detached* inputs: the backbone never gets gradient through τ, only through the
robust loss with τ held fixed. σ below is the logistic sigmoid. Scalar parameters are stored 1-dim
because DeepSpeed 0.19.8 cannot broadcast 0-dim parameters.

Precision: TempNet math always runs in fp32 (DESIGN §10), whatever dtype the engine stored the
parameters in and whatever autocast is active: the readout's `(attn − 1/M) ⊙ v` cancels in bf16 and
bf16 has only 8 bits of mantissa, so a bf16 τ would take a handful of distinct values.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def fp32_math(device: torch.device) -> Iterator[None]:
    """Autocast off: TempNet's matmuls must not be downcast to bf16 by an enclosing autocast."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _math_dtype(param: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 parameters; fp64 stays fp64 (the exactness tests)."""
    return torch.promote_types(param.dtype, torch.float32)


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter in math precision (differentiable: its gradient flows back in the parameter's dtype)."""
    return None if t is None else t.to(_math_dtype(t))


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(_math_dtype(layer.weight)), _fp32(layer.weight), _fp32(layer.bias))


def _bounded_tau(score: torch.Tensor, tau_min: float, tau_max: float) -> torch.Tensor:
    return (tau_max - tau_min) * torch.sigmoid(score) + tau_min


class _Readout(nn.Module):
    """τ = (τ_max − τ_min)·sigmoid(wᵀ((softmax(p / e^s) − 1/M) ⊙ v) + b) + τ_min.

    Shared by both TempNets: an attention over M prototype/hidden scores p decides which of the
    values v push the temperature up or down. w = 1, b = 0 at init, as in the paper; e^s starts at
    `temperature`. While the attention is near uniform the first term is ~0 and only b (which moves
    every τ alike) learns, so the initial temperature decides whether τ can differ between inputs.
    """

    def __init__(self, width: int, tau_min: float, tau_max: float, temperature: float = 1.0) -> None:
        super().__init__()
        if not 0 < tau_min < tau_max:
            raise ValueError(f"TempNet needs 0 < tau_min < tau_max, got tau_min={tau_min}, tau_max={tau_max}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"TempNet's readout temperature must be a finite number > 0, got {temperature}")
        self.width = width
        self.tau_min = float(tau_min)
        self.tau_max = float(tau_max)
        self.log_scale = nn.Parameter(torch.full((1,), math.log(temperature)))
        self.out = nn.Linear(width, 1)
        nn.init.ones_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        with fp32_math(scores.device):
            scale = _fp32(self.log_scale)
            attn = torch.softmax(scores.to(scale.dtype) / scale.exp(), dim=-1)
            score = _linear32(self.out, (attn - 1.0 / self.width) * values.to(attn.dtype)).squeeze(-1)
            return _bounded_tau(score, self.tau_min, self.tau_max)


class _TempNet(nn.Module):
    """What both TempNets share: a bounded readout and its τ range."""

    readout: _Readout

    @property
    def tau_min(self) -> float:
        return self.readout.tau_min

    @property
    def tau_max(self) -> float:
        return self.readout.tau_max


class LMTempNet(_TempNet):
    """Per-token temperature from the token's logits (DESIGN §2.1).

    x = normalize(z); h = W2·σ(W1 x) (dropout after σ); τ = readout(h, h), its softmax at temperature
    1 at init (the paper's LM code). `first` (W1, V→hidden) is exposed separately because the fused
    loss applies it without ever forming normalize(z): W1·normalize(z) = (W1·W_U)·h / ‖z‖.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int = 256,
        tau_min: float = 0.01,
        tau_max: float = 1.5,
        dropout: float = 0.5,
        readout_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.first = nn.Linear(vocab_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.second = nn.Linear(hidden_size, hidden_size)
        self.readout = _Readout(hidden_size, tau_min, tau_max, readout_temperature)

    def tau_from_first_layer(self, pre: torch.Tensor) -> torch.Tensor:
        """τ (fp32) given W1·normalize(z) + b1 (shape [N, hidden])."""
        with fp32_math(pre.device):
            h = _linear32(self.second, self.dropout(torch.sigmoid(pre.to(_math_dtype(self.second.weight)))))
            return self.readout(h, h)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        with fp32_math(logits.device):
            x = F.normalize(logits.detach().to(_math_dtype(self.first.weight)), dim=-1)
            return self.tau_from_first_layer(_linear32(self.first, x))


class CLIPTempNet(_TempNet):
    """Per-sample temperature from an L2-normalized image or text feature (DESIGN §2.2).

    x = dropout(σ(W e)); p = x·normalize(P)ᵀ for M learnable prototypes P; τ = readout(p, σ(p)).
    The readout's softmax starts at temperature 0.01, as in the paper's CLIP code (its `scaler` is
    initialized to log 0.01): the scores p differ between prototypes by ~0.1, so at temperature 1 the
    attention is uniform to 1% (H/log M = 0.99 measured) and τ can only move as a whole.
    """

    def __init__(
        self,
        embed_dim: int,
        num_prototypes: int = 256,
        tau_min: float = 0.005,
        tau_max: float = 0.05,
        dropout: float = 0.0,
        readout_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_prototypes = num_prototypes
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, embed_dim) / embed_dim**0.5)
        self.readout = _Readout(num_prototypes, tau_min, tau_max, readout_temperature)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with fp32_math(features.device):
            x = self.dropout(torch.sigmoid(_linear32(self.proj, features.detach())))
            p = x @ F.normalize(_fp32(self.prototypes), dim=-1).t()
            return self.readout(p, torch.sigmoid(p))
