"""CLIP contrastive losses over a globally synchronized batch (DESIGN §2.2).

Every loss is an `nn.Module` called on each rank with that rank's LOCAL, already L2-normalized
features and the samples' stable integer ids:

    out = loss_fn(image_features[B, d], text_features[B, d], sample_ids[B])
    out.loss.backward()   # then average parameter gradients over ranks (DDP / DeepSpeed do)

`out.loss` is built so that the rank-averaged parameter gradients equal the single-process gradient
of the global objective on the concatenated batch (n = K·B pairs, rank r's pairs at rows r·B..).
All ranks must pass the same B and must call the loss in lockstep (it runs collectives).

Losses:
- `CLIPInfoNCELoss`: symmetric InfoNCE with a learnable global temperature (the CLIP baseline).
- `GlobalDROContrastiveLoss`: iSogCLR objective with per-sample τ from two TempNets (the contract).
- `SogCLRLoss`: same objective with one global τ.
- `ISogCLRLoss`: same objective with a per-sample τ table, sharded like the u statistics.

The three DRO variants share one implementation (`_DROContrastiveLoss`); they differ only in where
τ comes from.

How the DRO loss is distributed. With S = E·Tᵀ (n×n) and the weights w held fixed, the model part
of F has n·∂F/∂S = G with G_ij = w^I_ij + w^T_ij (i ≠ j) and G_ii = −(Σ_j w^I_ij + Σ_k w^T_ki), so
n·∂F/∂e_i = Σ_j G_ij t_j and n·∂F/∂t_j = Σ_i G_ij e_i. Rank r therefore needs only its rows
S[local, :] (for its images) and its columns S[:, local] (for its texts). It all-gathers the
features without gradient, computes G on those rows and columns (which needs τ and u of every
sample in the global batch: exchanged as per-sample scalars), forms G[local,:]·T_all and
G[:,local]ᵀ·E_all without autograd, and backpropagates the surrogate

    (K/n) · ( Σ_a e_a·sg(G[a,:]·T_all) + Σ_a t_a·sg(G[:,a]ᵀ·E_all) + Σ_a sg(∂F/∂τ_a)·τ_a )

whose gradient w.r.t. the local features (and the TempNets) is K·∂F/∂(local features). Averaging
over the K ranks then gives exactly ∇F. No gradient of features is ever exchanged, and backward
through the loss itself costs O(B·d). Per step each rank sends its B ids, its B×2d features (in
their own dtype), n rows of per-sample scalars (one all-reduce that assembles the batch's stored u
from the ranks owning the ids, plus every sample's τ) and B rows of updated u.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dist_tempnet import comm
from dist_tempnet.dro_state import DROState
from dist_tempnet.tempnet import CLIPTempNet

__all__ = [
    "CLIPInfoNCELoss",
    "ContrastiveOutput",
    "GlobalDROContrastiveLoss",
    "ISogCLRLoss",
    "SogCLRLoss",
    "build_contrastive_loss",
    "gamma_schedule",
]

_MAX_LOGIT_SCALE = 100.0
_DRO_STATE_PREFIX = "dro_state."


@dataclass
class ContrastiveOutput:
    """What every contrastive loss returns.

    loss: scalar to backpropagate (see the module docstring for its gradient).
    image_tau, text_tau: [B] detached temperatures used for this rank's samples (a global τ is
        broadcast to [B]).
    tensor_stats: per-rank scalars for logging (this rank's samples only; no extra collectives), as
        0-dim tensors on the loss's device: the training loop accumulates them without a host sync.
    stats: the same as floats (one device→host copy, on first access).
    """

    loss: torch.Tensor
    image_tau: torch.Tensor
    text_tau: torch.Tensor
    tensor_stats: dict[str, torch.Tensor | float] = field(default_factory=dict)

    @functools.cached_property
    def stats(self) -> dict[str, float]:
        return _to_floats(self.tensor_stats)


# ------------------------------------------------------------------------------------------ helpers


def _check_inputs(image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(
            f"image and text features must both be [B, d], got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    if ids.shape != (image.shape[0],):
        raise ValueError(f"sample_ids must be [B] = [{image.shape[0]}], got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"sample_ids must be an integer tensor, got {ids.dtype}")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # fp32 even for bf16/fp16 inputs: exp(d/τ) at τ = 0.005 needs the mantissa.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _summary(name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
    values = values.detach().to(torch.float64)
    return {f"{name}_mean": values.mean(), f"{name}_min": values.min(), f"{name}_max": values.max()}


def _to_floats(stats: dict[str, torch.Tensor | float]) -> dict[str, float]:
    # One device→host copy for all tensor statistics instead of one sync per value.
    out = {k: float(v) for k, v in stats.items() if not isinstance(v, torch.Tensor)}
    tensors = {
        k: v.detach().to(torch.float64).reshape(()) for k, v in stats.items() if isinstance(v, torch.Tensor)
    }
    if tensors:
        out |= dict(zip(tensors, torch.stack(list(tensors.values())).tolist()))
    return {k: out[k] for k in stats}


def _moving_average(
    u_hat: torch.Tensor,
    u_shift: torch.Tensor,
    visited: torch.Tensor,
    g_hat: torch.Tensor,
    g_shift: torch.Tensor,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u ← (1−γ)·u + γ·g (u ← g at a first visit), all in (u_hat, shift) form.

    The new shift is the larger log-magnitude of the two terms, so u_hat ∈ [1, 2]: it rescales
    when a new g's shift exceeds the stored one (exp(d/τ) would overflow) and also when it falls far
    below it (u_hat would otherwise underflow after many decays).
    """
    log_keep = math.log1p(-gamma) if gamma < 1.0 else -math.inf
    log_mix = math.log(gamma) if gamma > 0.0 else -math.inf
    log_old = torch.where(visited, u_shift + torch.log(u_hat) + log_keep, -math.inf)
    new_weight = torch.where(visited, torch.full_like(g_shift, log_mix), torch.zeros_like(g_shift))
    log_new = g_shift + torch.log(g_hat) + new_weight
    shift = torch.maximum(log_old, log_new)
    return torch.exp(log_old - shift) + torch.exp(log_new - shift), shift


# ------------------------------------------------------------------------------------------ InfoNCE


class CLIPInfoNCELoss(nn.Module):
    """Symmetric InfoNCE over the global batch with a global temperature (CLIP).

    Features are all-gathered WITH gradient (comm.all_gather_with_grad); each rank scores only its
    own B rows against all n columns in both directions and returns the mean over its rows, so the
    rank average of `out.loss` is the global loss and rank-averaged gradients are its gradient.
    The temperature is a 1-dim parameter `log_inv_tau` = log(1/τ); the logit scale 1/τ is clamped to
    ≤ 100 as in CLIP (no gradient flows to `log_inv_tau` while clamped).
    """

    def __init__(self, init_tau: float = 0.07, learnable: bool = True) -> None:
        super().__init__()
        if init_tau <= 0:
            raise ValueError(f"init_tau must be > 0, got {init_tau}")
        self.log_inv_tau = nn.Parameter(torch.tensor([math.log(1.0 / init_tau)]), requires_grad=learnable)

    def logit_scale(self) -> torch.Tensor:
        return self.log_inv_tau.clamp(max=math.log(_MAX_LOGIT_SCALE)).exp()

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, sample_ids: torch.Tensor
    ) -> ContrastiveOutput:
        _check_inputs(image_features, text_features, sample_ids)
        batch = image_features.shape[0]
        dtype = _compute_dtype(image_features, text_features)
        image, text = image_features.to(dtype), text_features.to(dtype)
        all_image = comm.all_gather_with_grad(image)
        all_text = comm.all_gather_with_grad(text)
        scale = self.logit_scale().to(dtype)
        targets = torch.arange(batch, device=image.device) + comm.batch_offset(batch)
        image_loss = F.cross_entropy(scale * image @ all_text.t(), targets)
        text_loss = F.cross_entropy(scale * text @ all_image.t(), targets)
        loss = 0.5 * (image_loss + text_loss)
        tau = (1.0 / scale.detach()).expand(batch)
        stats = {"loss": loss.detach(), "tau": tau[0], "logit_scale": scale.detach()}
        return ContrastiveOutput(loss, tau, tau, stats)


# ------------------------------------------------------------------------------------------ DRO core


@dataclass
class _Exchanged:
    """What every rank knows about the global batch before computing its rows and columns."""

    ids: torch.Tensor  # [n] sample ids, rank order
    image: torch.Tensor  # [n, d] features, compute dtype, no grad
    text: torch.Tensor  # [n, d]
    positives: torch.Tensor  # [n] S_ii
    tau_image: torch.Tensor  # [n]
    tau_text: torch.Tensor  # [n]
    state_rows: torch.Tensor  # [n, fields + 1] this step's stored state (fields, visited)


class _DROContrastiveLoss(nn.Module):
    """Shared core of the DRO losses: F of DESIGN §2.2 for any source of per-sample τ.

    Subclasses say where τ comes from by overriding `_module_taus` (τ computed from the local
    features or a global parameter, possibly with gradient) or `_table_tau_fields` (τ read from the
    sharded per-sample table), and may store extra per-sample values with `_extra_field_updates`.

    u update: at a sample's first visit u = g, afterwards u ← (1−γ)·u + γ·g, where g is this step's
    batch estimate; the weights w and ∂F/∂τ of the CURRENT step use the UPDATED u (as iSogCLR does).
    `gamma` may be changed between steps (e.g. `loss_fn.gamma = gamma_schedule(...)`). Every call
    updates the state of the samples it sees: call it once per training (micro-)step, not for
    evaluation. Ids must lie in [0, num_samples); an id repeated in one global batch has each
    occurrence weighted with its own g and keeps the last occurrence's u.

    The per-sample statistics live in `self.dro_state` (a `DROState`, sharded by id over ranks), a
    plain attribute rather than buffers, so a parent module's state_dict and DeepSpeed's parameter
    broadcast never see per-rank data. `loss_fn.state_dict()` called directly adds this rank's shard
    as `dro_state.*` entries and `loss_fn.load_state_dict()` reads them back (same world size; for a
    different one build the state with `DROState.load_resharded`).
    """

    def __init__(
        self,
        num_samples: int,
        gamma: float,
        rho: float,
        state_device: str | torch.device = "cpu",
        extra_fields: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.rho = float(rho)
        self.dro_state = DROState(num_samples, comm.rank(), comm.world_size(), state_device, extra_fields)

    # ---------------------------------------------------------------- configuration

    @property
    def gamma(self) -> float:
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {value}")
        self._gamma = float(value)

    @property
    def num_samples(self) -> int:
        return self.dro_state.num_samples

    # ---------------------------------------------------------------- τ sources (subclass hooks)

    def _module_taus(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """[B] τ for the local samples, or None when τ comes from the state table."""
        return None

    def _table_tau_fields(self) -> tuple[str, str] | None:
        return None

    def _extra_field_updates(
        self,
        tau_image: torch.Tensor,
        tau_text: torch.Tensor,
        grad_image: torch.Tensor,
        grad_text: torch.Tensor,
    ) -> torch.Tensor:
        """[B, extra fields] new values of the extra state fields of the local samples."""
        return tau_image.new_zeros(tau_image.shape[0], 0)

    # ---------------------------------------------------------------- state dict

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        # Only a direct call adds the shard: a parent module recursing into us passes a prefix, and
        # per-rank data must not end up in a (rank 0 only) model checkpoint.
        if prefix == "" and not args:
            for key, value in self.dro_state.state_dict().items():
                out[_DRO_STATE_PREFIX + key] = value
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        dro = {
            k[len(_DRO_STATE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_DRO_STATE_PREFIX)
        }
        rest = {k: v for k, v in state_dict.items() if not k.startswith(_DRO_STATE_PREFIX)}
        if dro:
            self.dro_state.load_state_dict(dro, source=f"{type(self).__name__}.load_state_dict")
        elif strict:
            raise KeyError(
                f"{type(self).__name__}.load_state_dict: no '{_DRO_STATE_PREFIX}*' entries "
                "(pass strict=False to load only the parameters)"
            )
        return super().load_state_dict(rest, strict=strict, assign=assign)

    # ---------------------------------------------------------------- forward

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, sample_ids: torch.Tensor
    ) -> ContrastiveOutput:
        _check_inputs(image_features, text_features, sample_ids)
        self._check_world()
        batch = image_features.shape[0]
        n = batch * comm.world_size()
        if n < 2:
            raise ValueError("the DRO contrastive loss needs at least 2 pairs in the global batch")
        dtype = _compute_dtype(image_features, text_features)
        module_taus = self._module_taus(image_features, text_features)
        glob = self._exchange(image_features, text_features, sample_ids, module_taus, dtype)
        local = torch.arange(batch, device=image_features.device) + comm.batch_offset(batch)
        if module_taus is None:
            tau_image, tau_text = glob.tau_image[local], glob.tau_text[local]
        else:
            tau_image, tau_text = (tau.to(dtype) for tau in module_taus)
        return self._loss(image_features.to(dtype), text_features.to(dtype), tau_image, tau_text, glob, local)

    def _check_world(self) -> None:
        state = self.dro_state
        if (comm.rank(), comm.world_size()) != (state.rank, state.world_size):
            raise RuntimeError(
                f"{type(self).__name__} was built for rank {state.rank} of {state.world_size} but runs as "
                f"rank {comm.rank()} of {comm.world_size()}: initialize torch.distributed first, "
                "or reshard its state with DROState.load_resharded"
            )

    def _exchange(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        ids: torch.Tensor,
        module_taus: tuple[torch.Tensor, torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> _Exchanged:
        """The three forward collectives: ids, per-sample scalars, features (no gradient)."""
        batch, device = image.shape[0], image.device
        all_ids = comm.gather_no_grad(ids.to(device=device, dtype=torch.long))
        # One all-reduce assembles the batch's stored state (each owner fills its ids' rows, others
        # contribute zeros) together with the τ of every sample (each rank fills its own rows).
        n_state = len(self.dro_state.fields) + 1
        scalars = torch.zeros(all_ids.numel(), n_state + 2, dtype=torch.float64, device=device)
        scalars[:, :n_state] = self.dro_state.lookup(all_ids)
        if module_taus is not None:
            rows = slice(comm.batch_offset(batch), comm.batch_offset(batch) + batch)
            scalars[rows, n_state] = module_taus[0].detach().to(torch.float64)
            scalars[rows, n_state + 1] = module_taus[1].detach().to(torch.float64)
        scalars = comm.all_reduce_sum(scalars)
        if module_taus is None:
            fields = self._table_tau_fields()
            tau_columns = scalars[:, [self.dro_state.column(fields[0]), self.dro_state.column(fields[1])]]
        else:
            tau_columns = scalars[:, n_state:]
        # Features travel in their own dtype (bf16 stays bf16: lossless and half the bytes).
        pair = torch.cat([image.detach(), text.detach().to(image.dtype)], dim=1)
        all_pairs = comm.gather_no_grad(pair).to(dtype)
        dim = image.shape[1]
        all_image, all_text = all_pairs[:, :dim], all_pairs[:, dim:]
        return _Exchanged(
            ids=all_ids,
            image=all_image,
            text=all_text,
            positives=(all_image * all_text).sum(dim=1),
            tau_image=tau_columns[:, 0].to(dtype),
            tau_text=tau_columns[:, 1].to(dtype),
            state_rows=scalars[:, :n_state],
        )

    def _loss(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        tau_image: torch.Tensor,
        tau_text: torch.Tensor,
        glob: _Exchanged,
        local: torch.Tensor,
    ) -> ContrastiveOutput:
        n, world = glob.ids.numel(), comm.world_size()
        with torch.no_grad():
            step = self._statistics(image, text, tau_image.detach(), tau_text.detach(), glob, local)
        # K·(1/n) = 1/B: rank-averaged gradients are then exactly ∇F (see module docstring).
        per_rank = world / n
        model_part = (image * step.grad_image).sum() + (text * step.grad_text).sum()
        temp_part = (step.grad_tau_image * tau_image).sum() + (step.grad_tau_text * tau_text).sum()
        surrogate = per_rank * (model_part + temp_part)
        objective = per_rank * step.objective_terms.sum()
        # The value reported is this rank's share of F (rank average = F); the gradient is the surrogate's.
        loss = surrogate + (objective - surrogate).detach()
        stats = {"objective": objective, "gamma": self.gamma, "rho": self.rho, **step.stats}
        stats |= _summary("tau_image", tau_image) | _summary("tau_text", tau_text)
        return ContrastiveOutput(loss, tau_image.detach(), tau_text.detach(), stats)

    def _statistics(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        tau_image: torch.Tensor,
        tau_text: torch.Tensor,
        glob: _Exchanged,
        local: torch.Tensor,
    ) -> _StepStatistics:
        """g, the u update (with its collective), ∂F/∂τ, and ∂F/∂(local features) via G = ∂F/∂S.

        Both directions are laid out the same way, one local anchor per row: image_sims[a, j] = S_aj
        (our rows of S) and text_sims[a, i] = S_ia (our columns of S, transposed).
        """
        n = glob.ids.numel()
        mine = torch.arange(local.numel(), device=local.device)
        pos = glob.positives
        image_sims = image.detach() @ glob.text.t()
        text_sims = text.detach() @ glob.image.t()
        own_image = _own_anchors(image_sims, pos[local], tau_image, mine, local, n)
        own_text = _own_anchors(text_sims, pos[local], tau_text, mine, local, n)
        # The running average is kept in float64 whatever the compute dtype: it lives for the whole run.
        stored = glob.state_rows[local]
        visited = stored[:, -1] > 0.5
        u_image = _moving_average(stored[:, 0], stored[:, 1], visited, *own_image.g64(), self.gamma)
        u_text = _moving_average(stored[:, 2], stored[:, 3], visited, *own_text.g64(), self.gamma)
        w_image, log_u_image = own_image.weights(*u_image, n)
        w_text, log_u_text = own_text.weights(*u_text, n)
        # ∂F/∂τ = log u + ρ − Σ_j w_ij d_ij/τ_i (the self logit is 0 and its weight 0).
        grad_tau_image = log_u_image + self.rho - (w_image * own_image.logits).sum(dim=1)
        grad_tau_text = log_u_text + self.rho - (w_text * own_text.logits).sum(dim=1)
        extra = self._extra_field_updates(tau_image, tau_text, grad_tau_image, grad_tau_text)
        all_u = self._share_updated_state(glob.ids, u_image, u_text, extra).to(image_sims.dtype)
        # G_ij = w^I_ij + w^T_ij for i ≠ j; G_ii = −(Σ_j w^I_ij + Σ_k w^T_ki), as S_ii sits in every d.
        self_weight = -(w_image.sum(dim=1) + w_text.sum(dim=1))
        grad_rows = _other_anchor_weights(image_sims, pos, glob.tau_text, all_u[:, 2], all_u[:, 3], n)
        grad_rows.add_(w_image)
        grad_rows[mine, local] = self_weight
        grad_cols = _other_anchor_weights(text_sims, pos, glob.tau_image, all_u[:, 0], all_u[:, 1], n)
        grad_cols.add_(w_text)
        grad_cols[mine, local] = self_weight
        objective_terms = tau_image * (own_image.log_g() + self.rho) + tau_text * (
            own_text.log_g() + self.rho
        )
        stats = (
            _summary("log_u_image", log_u_image)
            | _summary("log_u_text", log_u_text)
            | _summary("grad_tau_image", grad_tau_image)
            | _summary("grad_tau_text", grad_tau_text)
            | {"first_visit_fraction": (~visited).to(torch.float64).mean()}
        )
        return _StepStatistics(
            grad_image=grad_rows @ glob.text,
            grad_text=grad_cols @ glob.image,
            grad_tau_image=grad_tau_image,
            grad_tau_text=grad_tau_text,
            objective_terms=objective_terms,
            stats=stats,
        )

    def _share_updated_state(
        self,
        all_ids: torch.Tensor,
        u_image: tuple[torch.Tensor, torch.Tensor],
        u_text: tuple[torch.Tensor, torch.Tensor],
        extra: torch.Tensor,
    ) -> torch.Tensor:
        """All-gather the updated rows of our samples; the owners store them. Returns [n, fields] float64."""
        mine = torch.stack([u_image[0], u_image[1], u_text[0], u_text[1]], dim=1)
        mine = torch.cat([mine, extra.to(mine.dtype)], dim=1)
        everyone = comm.gather_no_grad(mine)
        self.dro_state.update(all_ids, everyone)
        return everyone


@dataclass
class _OwnAnchors:
    """exp(d/τ) of this rank's anchors (one per row), shifted by the row max, and g = mean of it."""

    shifted_exp: torch.Tensor  # [B, n] exp(d_aj/τ_a − g_shift_a), 0 on the self entry
    logits: torch.Tensor  # [B, n] d_aj/τ_a, 0 on the self entry
    g_hat: torch.Tensor  # [B]   g = g_hat·exp(g_shift)
    g_shift: torch.Tensor  # [B]

    def g64(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.g_hat.to(torch.float64), self.g_shift.to(torch.float64)

    def log_g(self) -> torch.Tensor:
        return self.g_shift + torch.log(self.g_hat)

    def weights(
        self, u_hat: torch.Tensor, u_shift: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """w_aj = exp(d_aj/τ_a)/((n−1)·u_a) (in place of shifted_exp) and log u_a."""
        dtype = self.g_hat.dtype
        scale = (torch.exp(self.g_shift.to(torch.float64) - u_shift) / ((n - 1) * u_hat)).to(dtype)
        return self.shifted_exp.mul_(scale[:, None]), (u_shift + torch.log(u_hat)).to(dtype)


def _own_anchors(
    sims: torch.Tensor,
    positives: torch.Tensor,
    tau: torch.Tensor,
    mine: torch.Tensor,
    local: torch.Tensor,
    n: int,
) -> _OwnAnchors:
    inv_tau = 1.0 / tau
    logits = torch.addcmul((-positives * inv_tau)[:, None], sims, inv_tau[:, None])  # (S − S_aa)/τ_a
    logits[mine, local] = -math.inf
    g_shift = logits.amax(dim=1)
    shifted_exp = (logits - g_shift[:, None]).exp_()
    logits[mine, local] = 0.0
    return _OwnAnchors(shifted_exp, logits, shifted_exp.sum(dim=1) / (n - 1), g_shift)


def _other_anchor_weights(
    sims: torch.Tensor,
    positives: torch.Tensor,
    tau: torch.Tensor,
    u_hat: torch.Tensor,
    u_shift: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """[B, n] weights w_ja = exp((S − S_jj)/τ_j − shift_j)/((n−1)·u_hat_j) of every anchor j, for our rows.

    The self entries are left for the caller to overwrite (they may even be inf).
    """
    inv_tau = 1.0 / tau
    offset = positives * inv_tau + u_shift
    return (
        torch.addcmul(-offset[None, :], sims, inv_tau[None, :])
        .exp_()
        .mul_((1.0 / ((n - 1) * u_hat))[None, :])
    )


@dataclass
class _StepStatistics:
    grad_image: torch.Tensor  # [B, d] n·∂F/∂(local image features), with weights held fixed
    grad_text: torch.Tensor  # [B, d]
    grad_tau_image: torch.Tensor  # [B] ∂F_i/∂τ^I_i
    grad_tau_text: torch.Tensor  # [B]
    objective_terms: torch.Tensor  # [B] τ^I(log g^I + ρ) + τ^T(log g^T + ρ)
    stats: dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ variants


class GlobalDROContrastiveLoss(_DROContrastiveLoss):
    """iSogCLR + TempNet (DESIGN §2.2): per-sample τ^I = image_tempnet(e), τ^T = text_tempnet(t).

    The TempNets read detached features; they get gradient only through the temperature part of the
    surrogate, sg(∂F/∂τ)·τ. Both TempNets are submodules (their parameters are in state_dict and
    in `parameters()`), replicated on every rank like any other parameter.
    """

    def __init__(
        self,
        num_samples: int,
        gamma: float,
        rho: float,
        image_tempnet: nn.Module,
        text_tempnet: nn.Module,
        state_device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(num_samples, gamma, rho, state_device)
        self.image_tempnet = image_tempnet
        self.text_tempnet = text_tempnet

    def _module_taus(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_tempnet(image), self.text_tempnet(text)


class SogCLRLoss(_DROContrastiveLoss):
    """SogCLR: one global τ for all samples (a 1-dim parameter `tau`, optionally learned through ∂F/∂τ).

    A learned τ is clamped to [tau_min, tau_max] in the forward pass; `rho` only matters when learned.
    """

    def __init__(
        self,
        num_samples: int,
        gamma: float,
        init_tau: float = 0.03,
        learnable: bool = False,
        rho: float = 0.0,
        tau_min: float = 0.005,
        tau_max: float = 1.0,
        state_device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(num_samples, gamma, rho, state_device)
        if not 0 < tau_min <= init_tau <= tau_max:
            raise ValueError(
                f"SogCLRLoss needs 0 < tau_min <= init_tau <= tau_max, got {tau_min}, {init_tau}, {tau_max}"
            )
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.tau = nn.Parameter(torch.tensor([float(init_tau)]), requires_grad=learnable)

    def _module_taus(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tau = self.tau.clamp(self.tau_min, self.tau_max).expand(image.shape[0])
        return tau, tau


class ISogCLRLoss(_DROContrastiveLoss):
    """iSogCLR: a per-sample τ^I, τ^T table learned directly, stored in the sharded DRO state.

    The table is NOT a parameter (that would replicate a dataset-sized tensor on every rank): it
    lives in `dro_state` fields `tau_image`/`tau_text` (initialized to `tau_init`), owned by the
    same rank as the sample's u. The loss updates it itself at every step with projected SGD on
    the per-sample objective, τ ← clip(τ − tau_lr·∂F_i/∂τ_i, tau_min, tau_max), where ∂F_i/∂τ_i =
    log u_i + ρ − Σ_j w_ij d_ij/τ_i is computed with this step's updated u. The new τ takes effect
    at the sample's next visit. `out.loss` then only carries the model gradient.
    """

    def __init__(
        self,
        num_samples: int,
        gamma: float,
        rho: float,
        tau_init: float = 0.03,
        tau_min: float = 0.005,
        tau_max: float = 0.05,
        tau_lr: float = 1e-3,
        state_device: str | torch.device = "cpu",
    ) -> None:
        if not 0 < tau_min <= tau_init <= tau_max:
            raise ValueError(
                f"ISogCLRLoss needs 0 < tau_min <= tau_init <= tau_max, got {tau_min}, {tau_init}, {tau_max}"
            )
        super().__init__(num_samples, gamma, rho, state_device, {"tau_image": tau_init, "tau_text": tau_init})
        self.tau_min, self.tau_max, self.tau_lr = float(tau_min), float(tau_max), float(tau_lr)

    def _table_tau_fields(self) -> tuple[str, str]:
        return "tau_image", "tau_text"

    def _extra_field_updates(
        self,
        tau_image: torch.Tensor,
        tau_text: torch.Tensor,
        grad_image: torch.Tensor,
        grad_text: torch.Tensor,
    ) -> torch.Tensor:
        new_image = (tau_image - self.tau_lr * grad_image).clamp(self.tau_min, self.tau_max)
        new_text = (tau_text - self.tau_lr * grad_text).clamp(self.tau_min, self.tau_max)
        return torch.stack([new_image, new_text], dim=1)


# ------------------------------------------------------------------------------------------ factory


_TEMPNET_KEYS = ("embed_dim", "num_prototypes", "tau_min", "tau_max", "dropout", "readout_temperature")


def _build_tempnet_loss(num_samples: int, cfg: dict) -> GlobalDROContrastiveLoss:
    tempnet_cfg = {k: cfg.pop(k) for k in _TEMPNET_KEYS if k in cfg}
    if "image_tempnet" not in cfg or "text_tempnet" not in cfg:
        if "embed_dim" not in tempnet_cfg:
            raise ValueError(
                "isogclr_tempnet needs image_tempnet/text_tempnet modules or embed_dim to build them"
            )
        cfg.setdefault("image_tempnet", CLIPTempNet(**tempnet_cfg))
        cfg.setdefault("text_tempnet", CLIPTempNet(**tempnet_cfg))
    elif tempnet_cfg:
        raise ValueError(f"isogclr_tempnet: {sorted(tempnet_cfg)} given together with TempNet modules")
    return GlobalDROContrastiveLoss(num_samples, **cfg)


def build_contrastive_loss(name: str, num_samples: int, **cfg) -> nn.Module:
    """Build a contrastive loss by name: clip | sogclr | isogclr | isogclr_tempnet.

    `cfg` holds the constructor's keyword arguments. For isogclr_tempnet, pass either the two TempNet
    modules or the CLIPTempNet arguments (embed_dim, num_prototypes, tau_min, tau_max, dropout,
    readout_temperature).
    `num_samples` is ignored by clip.
    """
    builders = {
        "clip": lambda: CLIPInfoNCELoss(**cfg),
        "sogclr": lambda: SogCLRLoss(num_samples, **cfg),
        "isogclr": lambda: ISogCLRLoss(num_samples, **cfg),
        "isogclr_tempnet": lambda: _build_tempnet_loss(num_samples, dict(cfg)),
    }
    if name not in builders:
        raise ValueError(f"unknown contrastive loss '{name}', expected one of {sorted(builders)}")
    try:
        return builders[name]()
    except TypeError as exc:
        raise TypeError(f"contrastive loss '{name}': bad configuration {sorted(cfg)}: {exc}") from exc


def gamma_schedule(kind: str, gamma: float, step: int, total_steps: int, gamma_min: float = 0.2) -> float:
    """γ at `step`.

    'constant' → gamma; 'cosine' → cosine decay from gamma at step 0 to gamma_min at total_steps (held after).
    """
    if kind == "constant":
        return float(gamma)
    if kind != "cosine":
        raise ValueError(f"unknown gamma schedule '{kind}', expected 'constant' or 'cosine'")
    if total_steps <= 0:
        raise ValueError(f"gamma_schedule('cosine') needs total_steps > 0, got {total_steps}")
    if not 0.0 <= gamma_min <= gamma <= 1.0:
        raise ValueError(
            f"gamma_schedule needs 0 <= gamma_min <= gamma <= 1, got gamma_min={gamma_min}, gamma={gamma}"
        )
    progress = min(max(step, 0), total_steps) / total_steps
    return gamma_min + (gamma - gamma_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
