"""Single-process checks of the CLIP contrastive losses against direct fp64 references.

`reference_dro_step` spells out DESIGN §2.2 on the full n×n matrix with a plain per-id dict for u,
independently of dist_tempnet's implementation (no shifts, no sharding, no surrogate). The
distributed tests reuse it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_tempnet.losses.contrastive import (
    CLIPInfoNCELoss,
    ContrastiveOutput,
    GlobalDROContrastiveLoss,
    ISogCLRLoss,
    SogCLRLoss,
    build_contrastive_loss,
    gamma_schedule,
)
from dist_tempnet.tempnet import CLIPTempNet

TIGHT = {"rtol": 1e-9, "atol": 1e-11}


# ------------------------------------------------------------------------------------------ reference


def reference_dro_step(image, text, ids, tau_image, tau_text, u_state, gamma, rho):
    """One step of the global DRO objective on the whole batch.

    image, text: [n, d] normalized features; tau_*: [n] (may carry gradient to a TempNet/parameter);
    u_state: {id: (u_image, u_text)} updated in place (first visit u = g, else (1−γ)u + γg; an id
    repeated in the batch keeps its last occurrence). Returns (loss to backprop, F value, ∂F/∂τ).
    """
    n = image.shape[0]
    sim = image @ text.t()
    pos = sim.diagonal()
    off = ~torch.eye(n, dtype=torch.bool)
    d_image = sim - pos[:, None]  # d^I_ij = S_ij − S_ii
    d_text = sim - pos[None, :]  # d^T_ij = S_ij − S_jj
    ti, tt = tau_image.detach(), tau_text.detach()
    e_image = torch.exp(d_image.detach() / ti[:, None]) * off
    e_text = torch.exp(d_text.detach() / tt[None, :]) * off
    g_image = e_image.sum(dim=1) / (n - 1)
    g_text = e_text.sum(dim=0) / (n - 1)
    old = {int(i): u_state.get(int(i)) for i in ids}
    u_image, u_text = torch.empty(n, dtype=image.dtype), torch.empty(n, dtype=image.dtype)
    for k, i in enumerate(ids.tolist()):
        if old[i] is None:
            u_image[k], u_text[k] = g_image[k], g_text[k]
        else:
            u_image[k] = (1 - gamma) * old[i][0] + gamma * g_image[k]
            u_text[k] = (1 - gamma) * old[i][1] + gamma * g_text[k]
    for k, i in enumerate(ids.tolist()):
        u_state[i] = (u_image[k].item(), u_text[k].item())
    w_image = e_image / ((n - 1) * u_image[:, None])
    w_text = e_text / ((n - 1) * u_text[None, :])
    model_loss = (w_image * d_image).sum() / n + (w_text * d_text).sum() / n
    grad_tau_image = torch.log(u_image) + rho - (w_image * d_image.detach()).sum(dim=1) / ti
    grad_tau_text = torch.log(u_text) + rho - (w_text * d_text.detach()).sum(dim=0) / tt
    temp_loss = (grad_tau_image * tau_image).sum() / n + (grad_tau_text * tau_text).sum() / n
    objective = (ti * (torch.log(g_image) + rho)).sum() / n + (tt * (torch.log(g_text) + rho)).sum() / n
    return model_loss + temp_loss, objective, (grad_tau_image, grad_tau_text)


def reference_infonce(image, text, logit_scale):
    logits = logit_scale * image @ text.t()
    targets = torch.arange(image.shape[0])
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def stored_u(loss_fn, sample_id: int) -> tuple[float, float]:
    """(u_image, u_text) of one sample from the loss's DRO state, undoing the shift."""
    state = loss_fn.dro_state
    row = state.table[sample_id // state.world_size]
    return (
        (row[state.column("u_image")] * row[state.column("shift_image")].exp()).item(),
        (row[state.column("u_text")] * row[state.column("shift_text")].exp()).item(),
    )


def unit_rows(*shape, generator, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


# ------------------------------------------------------------------------------------------ fixtures

N_SAMPLES, BATCH, DIM = 10, 6, 5
# Ids repeat across steps, a duplicate inside one batch included (step 3: id 7 twice).
ID_SCHEDULE = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 0, 1], [2, 3, 6, 7, 4, 9], [7, 5, 8, 1, 7, 0]]
GAMMAS = [0.9, 0.5, 0.3, 0.7]


def make_tempnets(seed: int = 0, dim: int = DIM, tau_min: float = 0.005, tau_max: float = 0.05):
    torch.manual_seed(seed)
    image_net = CLIPTempNet(dim, num_prototypes=4, tau_min=tau_min, tau_max=tau_max).double()
    text_net = CLIPTempNet(dim, num_prototypes=4, tau_min=tau_min, tau_max=tau_max).double()
    # Spread the readout so τ differs visibly between samples.
    for net in (image_net, text_net):
        with torch.no_grad():
            net.readout.out.weight.mul_(5.0)
    return image_net, text_net


def leaf_features(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    raw_image = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    raw_text = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    return raw_image, raw_text


def grads_of(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


# ------------------------------------------------------------------------------------------ DRO + TempNet


def test_tempnet_loss_matches_reference_over_steps():
    rho = 0.7
    image_net, text_net = make_tempnets()
    ref_image_net, ref_text_net = copy.deepcopy(image_net), copy.deepcopy(text_net)
    loss_fn = GlobalDROContrastiveLoss(N_SAMPLES, GAMMAS[0], rho, image_net, text_net)
    u_ref: dict[int, tuple[float, float]] = {}
    for step, (ids, gamma) in enumerate(zip(ID_SCHEDULE, GAMMAS)):
        ids = torch.tensor(ids)
        loss_fn.gamma = gamma
        raw_image, raw_text = leaf_features(step)
        loss_fn.zero_grad()
        out = loss_fn(F.normalize(raw_image, dim=-1), F.normalize(raw_text, dim=-1), ids)
        out.loss.backward()

        ref_raw_image = raw_image.detach().clone().requires_grad_()
        ref_raw_text = raw_text.detach().clone().requires_grad_()
        image, text = F.normalize(ref_raw_image, dim=-1), F.normalize(ref_raw_text, dim=-1)
        ref_image_net.zero_grad()
        ref_text_net.zero_grad()
        tau_image, tau_text = ref_image_net(image), ref_text_net(text)
        ref_loss, objective, _ = reference_dro_step(image, text, ids, tau_image, tau_text, u_ref, gamma, rho)
        ref_loss.backward()

        assert isinstance(out, ContrastiveOutput)
        torch.testing.assert_close(out.loss.detach(), objective, **TIGHT)
        assert out.stats["objective"] == pytest.approx(objective.item(), rel=1e-12)
        torch.testing.assert_close(out.image_tau, tau_image.detach(), **TIGHT)
        torch.testing.assert_close(out.text_tau, tau_text.detach(), **TIGHT)
        torch.testing.assert_close(raw_image.grad, ref_raw_image.grad, **TIGHT)
        torch.testing.assert_close(raw_text.grad, ref_raw_text.grad, **TIGHT)
        for ours, ref in zip(grads_of(loss_fn), grads_of(ref_image_net) + grads_of(ref_text_net)):
            torch.testing.assert_close(ours, ref, **TIGHT)
        for sample_id, expected in u_ref.items():
            assert stored_u(loss_fn, sample_id) == pytest.approx(expected, rel=1e-10)
    visited = loss_fn.dro_state.visited
    assert visited.tolist() == [i in u_ref for i in range(N_SAMPLES)]


def test_tau_stays_in_tempnet_range():
    image_net, text_net = make_tempnets(tau_min=0.01, tau_max=0.02)
    loss_fn = GlobalDROContrastiveLoss(N_SAMPLES, 0.9, 0.5, image_net, text_net)
    gen = torch.Generator().manual_seed(1)
    out = loss_fn(
        unit_rows(BATCH, DIM, generator=gen), unit_rows(BATCH, DIM, generator=gen), torch.arange(BATCH)
    )
    for tau in (out.image_tau, out.text_tau):
        assert tau.min() >= 0.01 and tau.max() <= 0.02
    assert 0.01 <= out.stats["tau_image_min"] <= out.stats["tau_image_max"] <= 0.02


def _aligned_bf16_batch(seed: int, batch: int = 16, dim: int = 16):
    """Pairs whose negatives are often closer than the positive: d/τ ≈ ±400 at τ = 0.005."""
    gen = torch.Generator().manual_seed(seed)
    base = unit_rows(batch, dim, generator=gen, dtype=torch.float32)
    image = base
    text = F.normalize(base.roll(1, dims=0) + 0.05 * torch.randn(batch, dim, generator=gen), dim=-1)
    return image.bfloat16().requires_grad_(), text.bfloat16().requires_grad_()


@pytest.mark.parametrize("variant", ["sogclr", "tempnet"])
def test_tiny_tau_with_bf16_inputs_is_finite_and_accurate(variant):
    n = 16
    if variant == "sogclr":
        loss_fn = SogCLRLoss(2 * n, gamma=0.5, init_tau=0.005)
    else:
        image_net = CLIPTempNet(16, num_prototypes=4, tau_min=0.005, tau_max=0.00501)
        text_net = CLIPTempNet(16, num_prototypes=4, tau_min=0.005, tau_max=0.00501)
        loss_fn = GlobalDROContrastiveLoss(2 * n, 0.5, 1.0, image_net, text_net)
    u_ref: dict[int, tuple[float, float]] = {}
    for step, ids in enumerate([torch.arange(n), torch.arange(n).flip(0), torch.arange(n) + n // 2]):
        image, text = _aligned_bf16_batch(step)
        out = loss_fn(image, text, ids)
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
        assert torch.isfinite(image.grad.float()).all() and torch.isfinite(text.grad.float()).all()
        assert math.isfinite(out.stats["log_u_image_max"]) and out.stats["log_u_image_max"] > 100  # e^100+
        assert torch.isfinite(loss_fn.dro_state.table).all()
        # Same step in fp64 with exactly the τ the loss used: the objective agrees.
        tau_i, tau_t = out.image_tau.double(), out.text_tau.double()
        _, objective, _ = reference_dro_step(
            image.double(), text.double(), ids, tau_i, tau_t, u_ref, 0.5, loss_fn.rho
        )
        assert out.loss.item() == pytest.approx(objective.item(), rel=2e-4)
        for sample_id, (u_image, u_text) in u_ref.items():
            ours = loss_fn.dro_state.table[sample_id]
            assert (ours[1] + ours[0].log()).item() == pytest.approx(math.log(u_image), rel=1e-4)
            assert (ours[3] + ours[2].log()).item() == pytest.approx(math.log(u_text), rel=1e-4)


def test_moving_average_survives_shift_collapse():
    """u built at τ = 0.005 from near-positive negatives, then only far negatives: no under/overflow."""
    loss_fn = SogCLRLoss(4, gamma=0.9, init_tau=0.005)
    close = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    image = close.clone().requires_grad_()
    loss_fn(image, close.flip(0), torch.tensor([0, 1])).loss.backward()  # negatives beat positives
    first = loss_fn.dro_state.field("shift_image").clone()
    for _ in range(60):  # a u_hat kept at the old shift would decay to 0.1^60: below float32's range
        image = close.clone().requires_grad_()
        out = loss_fn(image, close, torch.tensor([0, 1]))  # positives far ahead now
        out.loss.backward()
        assert torch.isfinite(image.grad).all()
    assert torch.isfinite(loss_fn.dro_state.table).all()
    shift, u_hat = loss_fn.dro_state.field("shift_image")[:2], loss_fn.dro_state.field("u_image")[:2]
    assert (shift == pytest.approx(200 - 60 * math.log(10), rel=1e-6)) and (first[:2] == 200).all()
    assert ((u_hat >= 1) & (u_hat <= 2)).all()


# ------------------------------------------------------------------------------------------ baselines


def test_sogclr_learnable_global_tau_matches_reference():
    rho = 0.3
    loss_fn = SogCLRLoss(N_SAMPLES, gamma=0.8, init_tau=0.04, learnable=True, rho=rho)
    ref_tau = nn.Parameter(torch.tensor([0.04]).double())  # the loss's fp32 parameter, exactly
    u_ref: dict[int, tuple[float, float]] = {}
    for step, ids in enumerate(ID_SCHEDULE[:3]):
        ids = torch.tensor(ids)
        raw_image, raw_text = leaf_features(step)
        loss_fn.zero_grad()
        out = loss_fn(F.normalize(raw_image, dim=-1), F.normalize(raw_text, dim=-1), ids)
        out.loss.backward()
        ref_tau.grad = None
        image, text = F.normalize(raw_image.detach(), dim=-1), F.normalize(raw_text.detach(), dim=-1)
        tau = ref_tau.expand(BATCH)
        ref_loss, objective, _ = reference_dro_step(image, text, ids, tau, tau, u_ref, 0.8, rho)
        ref_loss.backward()
        torch.testing.assert_close(out.loss.detach(), objective, **TIGHT)
        torch.testing.assert_close(loss_fn.tau.grad.double(), ref_tau.grad, rtol=1e-6, atol=1e-9)
        assert (out.image_tau == ref_tau.detach()).all() and out.text_tau.shape == (BATCH,)


def test_isogclr_updates_its_per_sample_tau_table_like_the_reference():
    rho, lr, tau_init = 0.5, 0.002, 0.03
    loss_fn = ISogCLRLoss(N_SAMPLES, gamma=0.8, rho=rho, tau_init=tau_init, tau_lr=lr)
    assert not list(loss_fn.parameters())  # the τ table is state, not a replicated parameter
    tau_ref = {"image": torch.full((N_SAMPLES,), tau_init, dtype=torch.float64)}
    tau_ref["text"] = tau_ref["image"].clone()
    u_ref: dict[int, tuple[float, float]] = {}
    for step, ids in enumerate(ID_SCHEDULE[:3]):
        ids = torch.tensor(ids)
        raw_image, raw_text = leaf_features(step)
        out = loss_fn(F.normalize(raw_image, dim=-1), F.normalize(raw_text, dim=-1), ids)
        out.loss.backward()
        ref_image = raw_image.detach().clone().requires_grad_()
        ref_text = raw_text.detach().clone().requires_grad_()
        tau_i, tau_t = tau_ref["image"][ids], tau_ref["text"][ids]
        image, text = F.normalize(ref_image, dim=-1), F.normalize(ref_text, dim=-1)
        ref_loss, objective, (grad_i, grad_t) = reference_dro_step(
            image, text, ids, tau_i, tau_t, u_ref, 0.8, rho
        )
        ref_loss.backward()
        tau_ref["image"][ids] = (tau_i - lr * grad_i).clamp(0.005, 0.05)
        tau_ref["text"][ids] = (tau_t - lr * grad_t).clamp(0.005, 0.05)
        torch.testing.assert_close(out.image_tau, tau_i, **TIGHT)
        torch.testing.assert_close(out.loss.detach(), objective, **TIGHT)
        torch.testing.assert_close(raw_image.grad, ref_image.grad, **TIGHT)
        torch.testing.assert_close(raw_text.grad, ref_text.grad, **TIGHT)
    torch.testing.assert_close(loss_fn.dro_state.field("tau_image"), tau_ref["image"], **TIGHT)
    torch.testing.assert_close(loss_fn.dro_state.field("tau_text"), tau_ref["text"], **TIGHT)


@pytest.mark.parametrize("init_tau", [0.07, 0.001])
def test_infonce_matches_direct_reference(init_tau):
    gen = torch.Generator().manual_seed(3)
    raw_image = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    raw_text = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    loss_fn = CLIPInfoNCELoss(init_tau=init_tau)
    out = loss_fn(F.normalize(raw_image, dim=-1), F.normalize(raw_text, dim=-1), torch.arange(BATCH))
    out.loss.backward()
    ref_image = raw_image.detach().clone().requires_grad_()
    ref_text = raw_text.detach().clone().requires_grad_()
    log_inv_tau = torch.tensor([math.log(1 / init_tau)], dtype=torch.float64, requires_grad=True)
    scale = log_inv_tau.exp().clamp(max=100.0)
    ref = reference_infonce(F.normalize(ref_image, dim=-1), F.normalize(ref_text, dim=-1), scale)
    ref.backward()
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(raw_image.grad, ref_image.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(raw_text.grad, ref_text.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(loss_fn.log_inv_tau.grad.double(), log_inv_tau.grad, rtol=1e-5, atol=1e-8)
    assert out.stats["logit_scale"] == pytest.approx(min(1 / init_tau, 100.0), rel=1e-6)
    assert out.image_tau.shape == (BATCH,) and out.image_tau[0].item() == pytest.approx(
        1 / out.stats["logit_scale"]
    )


# ------------------------------------------------------------------------------------------ API details


def test_gamma_schedule_values():
    assert gamma_schedule("constant", 0.9, 50, 100) == 0.9
    assert gamma_schedule("cosine", 0.9, 0, 100, gamma_min=0.1) == pytest.approx(0.9)
    assert gamma_schedule("cosine", 0.9, 50, 100, gamma_min=0.1) == pytest.approx(0.5)
    assert gamma_schedule("cosine", 0.9, 25, 100, gamma_min=0.1) == pytest.approx(
        0.1 + 0.8 * (1 + math.sqrt(0.5)) / 2
    )
    assert gamma_schedule("cosine", 0.9, 100, 100, gamma_min=0.1) == pytest.approx(0.1)
    assert gamma_schedule("cosine", 0.9, 500, 100, gamma_min=0.1) == pytest.approx(0.1)
    values = [gamma_schedule("cosine", 1.0, s, 10, gamma_min=0.2) for s in range(11)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError, match="unknown gamma schedule"):
        gamma_schedule("linear", 0.9, 0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        gamma_schedule("cosine", 0.9, 0, 0)


def test_gamma_can_be_set_between_steps_and_is_validated():
    loss_fn = SogCLRLoss(4, gamma=0.9)
    loss_fn.gamma = gamma_schedule("cosine", 0.9, 5, 10, gamma_min=0.1)
    assert loss_fn.gamma == pytest.approx(0.5)
    with pytest.raises(ValueError, match="gamma"):
        loss_fn.gamma = 1.5


def test_state_dict_holds_this_ranks_shard_but_parents_never_see_it():
    image_net, text_net = make_tempnets()
    loss_fn = GlobalDROContrastiveLoss(N_SAMPLES, 0.9, 0.5, image_net, text_net)
    gen = torch.Generator().manual_seed(0)
    loss_fn(unit_rows(BATCH, DIM, generator=gen), unit_rows(BATCH, DIM, generator=gen), torch.arange(BATCH))
    state = loss_fn.state_dict()
    assert {"dro_state.u_image", "dro_state.shift_text", "dro_state.visited", "dro_state.num_samples"} <= set(
        state
    )
    assert any(k.startswith("image_tempnet.") for k in state)
    assert not any("dro_state" in name for name, _ in loss_fn.named_buffers())

    parent = nn.ModuleDict({"loss": loss_fn})
    assert not any("dro_state" in k for k in parent.state_dict())

    fresh = GlobalDROContrastiveLoss(N_SAMPLES, 0.9, 0.5, *make_tempnets(seed=5))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.dro_state.table, loss_fn.dro_state.table)
    assert fresh.dro_state.visited.tolist() == loss_fn.dro_state.visited.tolist()
    torch.testing.assert_close(fresh.image_tempnet.proj.weight, loss_fn.image_tempnet.proj.weight)

    other = GlobalDROContrastiveLoss(N_SAMPLES + 1, 0.9, 0.5, *make_tempnets())
    with pytest.raises(ValueError, match="num_samples=10"):
        other.load_state_dict(state)
    with pytest.raises(KeyError, match="dro_state"):
        fresh.load_state_dict({k: v for k, v in state.items() if not k.startswith("dro_state.")})


def test_bad_inputs_give_clear_errors():
    loss_fn = SogCLRLoss(4, gamma=0.9)
    x = torch.eye(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sample ids must lie in \[0, 4\)"):
        loss_fn(x, x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="sample_ids must be"):
        loss_fn(x, x, torch.tensor([0]))
    with pytest.raises(TypeError, match="integer"):
        loss_fn(x, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        loss_fn(x[:1], x[:1], torch.tensor([0]))


def test_build_contrastive_loss_by_name():
    assert isinstance(build_contrastive_loss("clip", 10, init_tau=0.05), CLIPInfoNCELoss)
    assert isinstance(build_contrastive_loss("sogclr", 10, gamma=0.9), SogCLRLoss)
    assert isinstance(build_contrastive_loss("isogclr", 10, gamma=0.9, rho=6.0), ISogCLRLoss)
    built = build_contrastive_loss("isogclr_tempnet", 10, gamma=0.9, rho=6.0, embed_dim=8, num_prototypes=4)
    assert isinstance(built, GlobalDROContrastiveLoss) and built.image_tempnet.embed_dim == 8
    nets = make_tempnets()
    built = build_contrastive_loss(
        "isogclr_tempnet", 10, gamma=0.9, rho=6.0, image_tempnet=nets[0], text_tempnet=nets[1]
    )
    assert built.text_tempnet is nets[1]
    with pytest.raises(ValueError, match="unknown contrastive loss"):
        build_contrastive_loss("simclr", 10)
    with pytest.raises(TypeError, match="sogclr"):
        build_contrastive_loss("sogclr", 10, gamma=0.9, bogus=1)
