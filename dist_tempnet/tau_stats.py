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


def stat_key(prefix: str, stat: str) -> str:
    """`tau/image` + `p10` → `tau/image_p10`; a prefix ending in `/` (the LM's `tau/`) → `tau/p10`."""
    return f"{prefix}{stat}" if prefix.endswith("/") else f"{prefix}_{stat}"


def spread_tensors(
    tau: torch.Tensor,
    prefix: str,
    tau_min: float | None = None,
    tau_max: float | None = None,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """{prefix}_p10/_p50/_p90, and with bounds {prefix}_at_min/_at_max (shares of samples), as
    0-dim tensors on τ's device: no host sync, so the training loop can read them at log_every.
    `mask`: which values count (e.g. the valid tokens)."""
    flat = tau.detach().flatten().to(torch.float64)
    if flat.numel() == 0:
        nan = flat.new_tensor(math.nan)
        keys = ["p10", "p50", "p90"] + (["at_min", "at_max"] if tau_min is not None else [])
        return {stat_key(prefix, k): nan for k in keys}
    counted = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.flatten()
    q = torch.nanquantile(
        torch.where(counted, flat, torch.nan), flat.new_tensor(QUANTILES), interpolation="linear"
    )
    out = {stat_key(prefix, "p10"): q[0], stat_key(prefix, "p50"): q[1], stat_key(prefix, "p90"): q[2]}
    if tau_min is not None and tau_max is not None:
        slack = BOUND_TOLERANCE * (tau_max - tau_min)
        n = counted.sum().clamp(min=1)
        out[stat_key(prefix, "at_min")] = ((flat <= tau_min + slack) & counted).sum() / n
        out[stat_key(prefix, "at_max")] = ((flat >= tau_max - slack) & counted).sum() / n
    return out


def spread_metrics(
    tau: torch.Tensor, prefix: str, tau_min: float | None = None, tau_max: float | None = None
) -> dict[str, float]:
    """{prefix}_p10/_p50/_p90, and with bounds {prefix}_at_min/_at_max (shares of samples)."""
    return {k: float(v) for k, v in spread_tensors(tau, prefix, tau_min, tau_max).items()}


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
    """The last `size` samples' values of a few named per-sample columns, kept on their device.

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
            new = value.detach().flatten().to(torch.float64)  # stays on its device: no sync per step
            old = self.columns.get(name)
            self.columns[name] = (new if old is None else torch.cat([old, new]))[-self.size :]

    def __len__(self) -> int:
        return next(iter(self.columns.values())).numel() if self.columns else 0


# τ health thresholds, as shares of the range τ_max − τ_min or of the samples.
MOVED_SHARE = 0.01  # the median moved, or p10..p90 spread, by more than this share of the range
COLLAPSED_SHARE = 0.9  # this share of the samples sits on one bound


class TauHealth:
    """Watches the logged τ spread of per-sample temperatures and says when something is off.

    `prefixes` name the logged series (e.g. "tau/image" for tau/image_p10, _p50, _p90, _at_min,
    _at_max). `start` takes the first step's metrics as the initial τ; `check` (called with the
    metrics of a logged step) returns the warnings to emit, each kind once per series: τ has not
    moved from its initial value after warm-up (median and spread within MOVED_SHARE of the range),
    or τ sits on a bound for COLLAPSED_SHARE of the samples.
    """

    def __init__(self, prefixes: list[str], tau_min: float, tau_max: float, warmup_steps: int) -> None:
        self.prefixes, self.tau_min, self.tau_max = list(prefixes), float(tau_min), float(tau_max)
        self.warmup_steps = int(warmup_steps)
        self.initial: dict[str, float] = {}
        self.warned: set[tuple[str, str]] = set()

    def start(self, metrics: dict[str, float]) -> None:
        for prefix in self.prefixes:
            if stat_key(prefix, "p50") in metrics and prefix not in self.initial:
                self.initial[prefix] = float(metrics[stat_key(prefix, "p50")])

    def check(self, step: int, metrics: dict[str, float]) -> list[str]:
        if step <= self.warmup_steps:
            return []
        out, width = [], self.tau_max - self.tau_min
        for prefix in self.prefixes:
            p10, p50, p90 = (metrics.get(stat_key(prefix, q)) for q in ("p10", "p50", "p90"))
            if p50 is None or p10 is None or p90 is None:
                continue
            start = self.initial.get(prefix, p50)
            if abs(p50 - start) <= MOVED_SHARE * width and p90 - p10 <= MOVED_SHARE * width:
                out += self._once(
                    prefix,
                    "still",
                    f"{prefix}: τ has not moved from its initial value after warm-up (step {step}: "
                    f"p10/p50/p90 {p10:.5g}/{p50:.5g}/{p90:.5g}, initial median {start:.5g}, range "
                    f"[{self.tau_min:g}, {self.tau_max:g}]): TempNet is not learning a personalized τ "
                    "(check loss.tempnet_lr and loss.rho against log(global batch - 1) or log(vocab))",
                )
            for bound, value in (("min", self.tau_min), ("max", self.tau_max)):
                share = metrics.get(stat_key(prefix, f"at_{bound}"))
                if share is not None and share >= COLLAPSED_SHARE:
                    out += self._once(
                        prefix,
                        bound,
                        f"{prefix}: τ collapsed onto tau_{bound}={value:g} for {share:.0%} of the samples "
                        f"at step {step} (p10/p50/p90 {p10:.5g}/{p50:.5g}/{p90:.5g})",
                    )
        return out

    def _once(self, prefix: str, kind: str, message: str) -> list[str]:
        if (prefix, kind) in self.warned:
            return []
        self.warned.add((prefix, kind))
        return [message]


def rho_floor_warning(rho: float, candidates: int, what: str) -> str | None:
    """A message when ρ ≥ log(candidates), else None.

    τ's gradient is ∂/∂τ = ρ − KL(p_τ ‖ uniform) with fresh statistics (CLIP: p over the n − 1
    negatives of an anchor; LM: the softmax over the V tokens), and that KL never exceeds
    log(candidates): with ρ at or above it, every τ is pushed down to τ_min, whatever the sample.
    """
    if candidates < 2 or rho < math.log(candidates):
        return None
    return (
        f"loss.rho={rho:g} >= log({what} = {candidates}) = {math.log(candidates):.2f}: tau's gradient "
        f"rho - KL(p || uniform) is positive for every sample (KL <= {math.log(candidates):.2f}), so every "
        f"tau is pushed down to loss.tau_min; choose rho well below {math.log(candidates):.2f}"
    )
