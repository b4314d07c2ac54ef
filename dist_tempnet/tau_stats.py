"""Statistics of per-sample temperatures: spread, bound shares, rank correlation, tail accuracy.

Pure torch functions (tensors in, numbers out), used for τ health during training and for relating
τ to class or token frequency at evaluation (DESIGN §11: does TempNet personalize?).
"""

from __future__ import annotations

import math

import torch

QUANTILES = (0.1, 0.5, 0.9)
# τ within this share of the range (τ_max − τ_min) of a bound counts as sitting on it.
BOUND_TOLERANCE = 1e-3


def quantiles(values: torch.Tensor, qs: tuple[float, ...] = QUANTILES) -> list[float]:
    """The qs-quantiles of a flat tensor (linear interpolation); NaNs for an empty one."""
    flat = values.detach().flatten().to(torch.float64)
    if flat.numel() == 0:
        return [math.nan] * len(qs)
    return torch.quantile(flat, torch.tensor(qs, dtype=torch.float64, device=flat.device)).tolist()


def bound_shares(tau: torch.Tensor, tau_min: float, tau_max: float) -> tuple[float, float]:
    """Shares of τ values sitting on τ_min and on τ_max (within BOUND_TOLERANCE of the range)."""
    flat = tau.detach().flatten().to(torch.float64)
    if flat.numel() == 0:
        return math.nan, math.nan
    slack = BOUND_TOLERANCE * (tau_max - tau_min)
    return float((flat <= tau_min + slack).double().mean()), float((flat >= tau_max - slack).double().mean())


def spread_metrics(
    tau: torch.Tensor, prefix: str, tau_min: float | None = None, tau_max: float | None = None
) -> dict[str, float]:
    """{prefix}_p10/_p50/_p90, and with bounds {prefix}_at_min/_at_max (shares of samples)."""
    p10, p50, p90 = quantiles(tau)
    out = {f"{prefix}_p10": p10, f"{prefix}_p50": p50, f"{prefix}_p90": p90}
    if tau_min is not None and tau_max is not None:
        out[f"{prefix}_at_min"], out[f"{prefix}_at_max"] = bound_shares(tau, tau_min, tau_max)
    return out


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a flat tensor, ties sharing their average rank (as scipy.stats.rankdata)."""
    flat = values.detach().flatten().to(torch.float64)
    order = torch.argsort(flat, stable=True)
    sorted_values = flat[order]
    # Each run of equal values gets the mean of the positions it spans.
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(flat)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two equally long flat tensors; NaN when either is constant."""
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs equally many values, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / denom if denom > 0 else math.nan


def rarest_classes(class_frequency: list[float] | torch.Tensor, share: float = 1 / 3) -> list[int]:
    """Indices of the rarest `share` of classes (at least one), rarest first; ties by class index."""
    freq = torch.as_tensor(class_frequency, dtype=torch.float64)
    count = max(1, round(share * freq.numel()))
    return torch.argsort(freq, stable=True)[:count].tolist()


def accuracy_on_classes(correct: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> float:
    """Share of correct predictions among the samples whose label is in `classes` (NaN if none)."""
    chosen = torch.isin(labels, torch.as_tensor(classes, dtype=labels.dtype, device=labels.device))
    return float(correct[chosen].double().mean()) if chosen.any() else math.nan


class RecentSamples:
    """The last `size` samples' values of a few named per-sample columns, kept on the CPU.

    E.g. the τ the loss used for each trained sample and the sample's label: what τ is related to
    class frequency over at evaluation time (the τ of iSogCLR lives in per-sample state, not in a
    network that could be run on held-out data).
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"RecentSamples size must be >= 1, got {size}")
        self.size = size
        self.columns: dict[str, torch.Tensor] = {}

    def add(self, **columns: torch.Tensor) -> None:
        lengths = {name: value.numel() for name, value in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"RecentSamples.add needs equally long columns, got {lengths}")
        if self.columns and set(columns) != set(self.columns):
            raise ValueError(
                f"RecentSamples.add got columns {sorted(columns)}, expected {sorted(self.columns)}"
            )
        for name, value in columns.items():
            new = value.detach().flatten().to("cpu", torch.float64)
            old = self.columns.get(name)
            self.columns[name] = (new if old is None else torch.cat([old, new]))[-self.size :]

    def __len__(self) -> int:
        return next(iter(self.columns.values())).numel() if self.columns else 0
