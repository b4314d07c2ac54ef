"""Robust LM loss (DESIGN §2.1): the fused, chunked op against the plain reference, in fp64."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.exc import TorchDynamoException
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import dist_tempnet as dt
from dist_tempnet.losses import lm
from dist_tempnet.losses.lm import chunked_cross_entropy, naive_tempnet_lm_loss, tempnet_lm_loss
from dist_tempnet.tempnet import LMTempNet

REPO = Path(__file__).resolve().parents[1]
V, D, RHO = 50, 12, 7.5
TIGHT = {"rtol": 1e-9, "atol": 1e-12}


def make_case(n=37, shape=None, seed=0, dtype=torch.float64, ignore_every=5, dropout=0.0):
    gen = torch.Generator().manual_seed(seed)
    lead = shape or (n,)
    hidden = torch.randn(*lead, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(0, V, lead, generator=gen)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    torch.manual_seed(seed)
    tempnet = LMTempNet(V, hidden_size=16, dropout=dropout).double().eval()
    # Non-trivial readout so every TempNet parameter gets a sizeable gradient.
    with torch.no_grad():
        tempnet.readout.out.weight.normal_(0, 1)
        tempnet.readout.log_scale.fill_(-0.5)
    return hidden, weight, labels, tempnet


def loss_and_grads(loss_fn, hidden, weight, labels, tempnet, **kwargs):
    params = [hidden, weight, *tempnet.parameters()]
    for p in params:
        p.grad = None
    out = loss_fn(hidden, weight, labels, tempnet, RHO, **kwargs)
    out.loss.backward()
    grads = {"hidden": hidden.grad, "weight": weight.grad}
    grads |= {f"tempnet.{name}": p.grad for name, p in tempnet.named_parameters()}
    return out, {k: None if g is None else g.clone() for k, g in grads.items()}


def assert_same(fused, naive, fused_grads, naive_grads, **tol):
    tol = tol or TIGHT
    torch.testing.assert_close(fused.loss, naive.loss, **tol)
    torch.testing.assert_close(fused.ce, naive.ce, **tol)
    torch.testing.assert_close(fused.tau, naive.tau)
    assert fused.num_valid.item() == naive.num_valid.item()
    assert fused_grads.keys() == naive_grads.keys()
    for name in naive_grads:
        assert naive_grads[name] is not None and naive_grads[name].abs().max() > 0, name
        torch.testing.assert_close(fused_grads[name], naive_grads[name], msg=name, **tol)


def test_public_export():
    assert dt.tempnet_lm_loss is tempnet_lm_loss


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 4096])
def test_fused_matches_naive_with_ignored_tokens(chunk_size):
    case = make_case(n=37)
    naive, naive_grads = loss_and_grads(naive_tempnet_lm_loss, *case)
    fused, fused_grads = loss_and_grads(tempnet_lm_loss, *case, chunk_size=chunk_size)
    assert naive.num_valid.item() == 37 - 8
    assert_same(fused, naive, fused_grads, naive_grads)


def test_naive_matches_the_formula_directly():
    hidden, weight, labels, tempnet = make_case(n=9, ignore_every=3)
    out = naive_tempnet_lm_loss(hidden, weight, labels, tempnet, RHO)
    logits = (hidden @ weight.t()).detach()
    tau = tempnet(logits)
    per_token = [
        tau[t] * F.cross_entropy(logits[t] / tau[t], labels[t]) + (RHO - math.log(V)) * tau[t]
        for t in range(9)
        if labels[t] != -100
    ]
    torch.testing.assert_close(out.loss, torch.stack(per_token).mean(), **TIGHT)


def test_batched_inputs_are_flattened():
    case = make_case(shape=(3, 7))
    naive, naive_grads = loss_and_grads(naive_tempnet_lm_loss, *case)
    fused, fused_grads = loss_and_grads(tempnet_lm_loss, *case, chunk_size=4)
    assert fused.tau.shape == (21,) and fused.tau.dtype == torch.float32
    assert_same(fused, naive, fused_grads, naive_grads)


def test_loss_scale_count_matches_naive():
    case = make_case(n=20)
    naive, naive_grads = loss_and_grads(naive_tempnet_lm_loss, *case, loss_scale_count=13.5)
    fused, fused_grads = loss_and_grads(tempnet_lm_loss, *case, chunk_size=6, loss_scale_count=13.5)
    assert_same(fused, naive, fused_grads, naive_grads)
    unscaled = naive_tempnet_lm_loss(*case, RHO)
    torch.testing.assert_close(fused.loss * 13.5 / 16, unscaled.loss, **TIGHT)


def test_data_parallel_average_equals_global_mean():
    """Two 'ranks' with uneven valid counts: averaging their grads gives the full-batch gradient."""
    hidden, weight, labels, tempnet = make_case(n=24, ignore_every=0)
    labels = labels.clone()
    labels[:9] = -100  # rank 0 gets 3 valid tokens, rank 1 gets 12
    full, full_grads = loss_and_grads(tempnet_lm_loss, hidden, weight, labels, tempnet, chunk_size=5)
    global_count = (labels != -100).sum()
    world = 2
    rank_losses, rank_grads = [], []
    for rows in (slice(0, 12), slice(12, 24)):
        h = hidden.detach()[rows].clone().requires_grad_()
        out, grads = loss_and_grads(
            tempnet_lm_loss, h, weight, labels[rows], tempnet, chunk_size=5,
            loss_scale_count=global_count / world,
        )  # fmt: skip
        rank_losses.append(out.loss)
        rank_grads.append(grads)
    torch.testing.assert_close(sum(rank_losses) / world, full.loss, **TIGHT)
    for name in full_grads:
        if name == "hidden":
            averaged = torch.cat([g["hidden"] for g in rank_grads]) / world
        else:
            averaged = sum(g[name] for g in rank_grads) / world
        torch.testing.assert_close(averaged, full_grads[name], msg=name, **TIGHT)


def test_frozen_lm_trains_tempnet_only():
    hidden, weight, labels, tempnet = make_case(n=15)
    hidden, weight = hidden.detach(), weight.detach()
    naive, naive_grads = loss_and_grads(naive_tempnet_lm_loss, hidden, weight, labels, tempnet)
    fused, fused_grads = loss_and_grads(tempnet_lm_loss, hidden, weight, labels, tempnet, chunk_size=4)
    assert fused_grads.pop("hidden") is None and fused_grads.pop("weight") is None
    naive_grads.pop("hidden"), naive_grads.pop("weight")
    assert_same(fused, naive, fused_grads, naive_grads)


def test_no_grad_evaluation_gives_the_same_values():
    case = make_case(n=19)
    with torch.no_grad():
        naive = naive_tempnet_lm_loss(*case, RHO)
        fused = tempnet_lm_loss(*case, RHO, chunk_size=4)
        plain = chunked_cross_entropy(*case[:3], chunk_size=4)
    assert fused.loss.grad_fn is None
    torch.testing.assert_close(fused.loss, naive.loss, **TIGHT)
    torch.testing.assert_close(plain, naive.ce, **TIGHT)


def test_dropout_in_train_mode_matches_with_same_rng():
    hidden, weight, labels, tempnet = make_case(n=16, dropout=0.5)
    tempnet.train()
    torch.manual_seed(123)
    naive, naive_grads = loss_and_grads(naive_tempnet_lm_loss, hidden, weight, labels, tempnet)
    torch.manual_seed(123)
    fused, fused_grads = loss_and_grads(tempnet_lm_loss, hidden, weight, labels, tempnet, chunk_size=5)
    assert_same(fused, naive, fused_grads, naive_grads)


class _LeafTau(LMTempNet):
    """A 'TempNet' whose τ is a leaf tensor, to read ∂loss/∂τ directly."""

    def __init__(self, tau):
        super().__init__(V, hidden_size=4, dropout=0.0)
        self.double()
        self.leaf = torch.nn.Parameter(tau.clone())

    def tau_from_first_layer(self, pre):
        return self.leaf


def test_tau_gradient_is_entropy_term_and_label_free():
    n = 11
    hidden, weight, labels, _ = make_case(n=n, ignore_every=0)
    tau = torch.linspace(0.05, 1.4, n, dtype=torch.float64)
    logits = (hidden @ weight.t()).detach()
    probs = torch.softmax(logits / tau.unsqueeze(1), dim=1)
    entropy = -(probs * probs.log()).sum(1)
    expected = (entropy + RHO - math.log(V)) / n
    for seed in (1, 2):
        other_labels = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))
        for loss_fn in (naive_tempnet_lm_loss, tempnet_lm_loss):
            net = _LeafTau(tau)
            loss_fn(hidden, weight, other_labels, net, RHO).loss.backward()
            torch.testing.assert_close(net.leaf.grad, expected, **TIGHT)


def test_all_ignored_gives_zero_loss_and_finite_zero_grads():
    hidden, weight, labels, tempnet = make_case(n=10)
    labels = torch.full_like(labels, -100)
    for loss_fn in (naive_tempnet_lm_loss, tempnet_lm_loss):
        out, grads = loss_and_grads(loss_fn, hidden, weight, labels, tempnet)
        assert out.loss.item() == 0.0 and out.ce.item() == 0.0 and out.num_valid.item() == 0
        for name, g in grads.items():
            assert torch.isfinite(g).all() and g.abs().max() == 0, name
    assert chunked_cross_entropy(hidden, weight, labels).item() == 0.0


def test_empty_batch():
    hidden, weight, _, tempnet = make_case(n=0)
    out, grads = loss_and_grads(tempnet_lm_loss, hidden, weight, torch.zeros(0, dtype=torch.long), tempnet)
    assert out.loss.item() == 0.0 and out.tau.shape == (0,)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_bf16_inputs_with_tau_near_min_are_finite_and_accurate():
    hidden, weight, labels, tempnet = make_case(n=40, dtype=torch.bfloat16)
    tempnet = LMTempNet(V, hidden_size=16, tau_min=0.01, dropout=0.0).eval()
    with torch.no_grad():
        tempnet.readout.out.bias.fill_(-30.0)  # sigmoid ≈ 0: τ ≈ τ_min
        weight.mul_(4)  # large logit gaps: exp((z - max)/0.01) underflows for most of the vocabulary
    out, grads = loss_and_grads(tempnet_lm_loss, hidden, weight, labels, tempnet, chunk_size=16)
    assert out.tau.max() < 0.0101
    assert torch.isfinite(out.loss) and torch.isfinite(out.ce)
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
    # Same bf16 values in fp64: the fused op's fp32 logits keep it close.
    reference = naive_tempnet_lm_loss(
        hidden.detach().double(), weight.detach().double(), labels, tempnet.double(), RHO
    )
    torch.testing.assert_close(out.loss.double(), reference.loss, rtol=1e-4, atol=1e-5)


def test_head_row_blocks_stay_exact(monkeypatch):
    """Gram matrix, W1·W_U and (on GPUs) the head gradient walk W_U in row blocks: exact in fp64."""
    monkeypatch.setattr(lm, "_HEAD_ROW_BLOCK", 16)  # V = 50: blocks of 16, 16, 16, 2
    case = make_case(n=21)
    naive, naive_grads = loss_and_grads(naive_tempnet_lm_loss, *case)
    fused, fused_grads = loss_and_grads(tempnet_lm_loss, *case, chunk_size=8)
    assert_same(fused, naive, fused_grads, naive_grads)


def _emulate_out_dtype_mm(monkeypatch):
    """CPU has no torch.mm(bf16, bf16, out_dtype=fp32): emulate the CUDA kernel (same math)."""
    monkeypatch.setattr(lm, "_device_has_out_dtype_mm", lambda device: True)
    monkeypatch.setattr(lm, "_mm", lambda a, b, acc: a.to(acc) @ b.to(acc))
    monkeypatch.setattr(lm, "_mm_into", lambda a, b, out: torch.mm(a.to(out.dtype), b.to(out.dtype), out=out))


@pytest.mark.parametrize("compiled", [False, True])
def test_low_precision_operand_path(monkeypatch, compiled):
    """Where torch.mm can write fp32 from bf16 operands (CUDA), bf16 operands are kept; emulate that
    kernel on CPU to exercise the path, and compare with fp64 on the same bf16 values. compiled: the
    chunk kernel's code path (∂z into its own bf16 buffer), run uncompiled to keep this test cheap."""
    monkeypatch.setattr(lm, "_compiled_chunk_kernel", lambda: lm._chunk_kernel)
    hidden, weight, labels, _ = make_case(n=30, dtype=torch.bfloat16)
    tempnet = LMTempNet(V, hidden_size=16, dropout=0.0).double().eval()
    as_fp64 = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    reference, expected = loss_and_grads(naive_tempnet_lm_loss, *as_fp64, labels, tempnet)
    tempnet.float()
    monkeypatch.setattr(lm, "_HEAD_ROW_BLOCK", 16)
    _emulate_out_dtype_mm(monkeypatch)
    out, got = loss_and_grads(
        tempnet_lm_loss, hidden, weight, labels, tempnet, chunk_size=8, compiled=compiled
    )
    torch.testing.assert_close(out.loss.double(), reference.loss, rtol=1e-4, atol=1e-5)
    assert got["hidden"].dtype == got["weight"].dtype == torch.bfloat16
    for name, want in expected.items():
        scale = want.abs().max().item()  # bf16 gradients: error relative to the largest entry
        torch.testing.assert_close(got[name].double(), want, rtol=2e-2, atol=5e-3 * scale, msg=name)


class _FreshChunkTensors(TorchDispatchMode):
    """Records op results of a given shape that share no storage with the op's inputs: the chunk×V
    tensors ops allocate (an `out=` or in-place result is its input's storage; a view too)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.shape, self.fresh = shape, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != self.shape:
                continue
            if t.untyped_storage().data_ptr() not in inputs:
                self.fresh.append(f"{func.__name__} {t.dtype}")
        return out


def test_chunk_logits_go_into_one_reused_buffer(monkeypatch):
    """bf16 operands with fp32 products (CUDA's torch.mm out_dtype, emulated): each chunk's logits
    are written into one buffer and ∂z into one bf16 buffer, however many chunks there are."""
    hidden, weight, labels, _ = make_case(n=32, dtype=torch.bfloat16)
    tempnet = LMTempNet(V, hidden_size=16, dropout=0.0).eval()
    _emulate_out_dtype_mm(monkeypatch)
    chunk = 8  # four chunks
    with _FreshChunkTensors((chunk, V)) as fused_mode:
        tempnet_lm_loss(hidden, weight, labels, tempnet, RHO, chunk_size=chunk).loss.backward()
    with _FreshChunkTensors((chunk, V)) as ce_mode:
        chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk).backward()
    # Not counted: the emulation's fp32 copies of bf16 operands (CUDA's kernel reads bf16 directly).
    fused = sorted(r for r in fused_mode.fresh if r != "_to_copy.default torch.float32")
    ce = sorted(r for r in ce_mode.fresh if r != "_to_copy.default torch.float32")
    # The eager path's logits buffer and probability buffer (fp32), and ∂z as the bf16 matmul operand.
    assert fused == ["empty_like.default torch.float32", *ce], fused_mode.fresh
    assert ce == ["new_empty.default torch.bfloat16", "new_empty.default torch.float32"], ce_mode.fresh


def test_compiled_kernel_matches_fp64_reference(monkeypatch):
    """The torch.compile'd chunk kernel (inductor on CPU here) against the fp64 reference: values and
    gradients, ignored tokens, a short last chunk; the logits buffer is the one ∂z is written into."""
    case = make_case(n=37)  # chunks of 16, 16 and 5 (padded to 16: one shape, one compile)
    naive, naive_grads = loss_and_grads(naive_tempnet_lm_loss, *case)

    def no_eager(*args, **kwargs):
        raise AssertionError("the eager chunk path ran")

    monkeypatch.setattr(lm, "_eager_chunk", no_eager)
    seen = {"logits": [], "grad": []}
    logits, backprop = lm._HeadPass.logits, lm._HeadPass.backprop
    monkeypatch.setattr(
        lm._HeadPass, "logits", lambda self, rows: _record(seen["logits"], logits(self, rows))
    )
    monkeypatch.setattr(
        lm._HeadPass, "backprop", lambda self, rows, g: backprop(self, rows, _record(seen["grad"], g))
    )
    fused, fused_grads = loss_and_grads(tempnet_lm_loss, *case, chunk_size=16, compiled=True)
    assert_same(fused, naive, fused_grads, naive_grads)
    assert [n for n, _ in seen["logits"]] == [16, 16, 5] and [n for n, _ in seen["grad"]] == [16, 16, 5]
    assert len({ptr for _, ptr in seen["logits"] + seen["grad"]}) == 1  # one buffer: logits, then ∂z


def _record(log: list, t: torch.Tensor) -> torch.Tensor:
    log.append((t.shape[0], t.data_ptr()))
    return t


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise TorchDynamoException("no compiler on this box")

    monkeypatch.setattr(lm, "_compiled_chunk_kernel", lambda: broken)
    monkeypatch.setattr(lm, "_COMPILE_FAILED", set())
    case = make_case(n=20)
    naive, naive_grads = loss_and_grads(naive_tempnet_lm_loss, *case)
    with caplog.at_level(logging.WARNING, logger=lm.__name__):
        fused, fused_grads = loss_and_grads(tempnet_lm_loss, *case, chunk_size=8, compiled=True)
        loss_and_grads(tempnet_lm_loss, *case, chunk_size=8, compiled=True)
    assert_same(fused, naive, fused_grads, naive_grads)
    warned = [r.message for r in caplog.records if "eager path" in r.message]
    assert len(warned) == 1, warned  # once: later calls go straight to the eager path
    assert "kernel failed on cpu (no compiler on this box)" in warned[0]


def test_compile_is_automatic_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert lm._use_compiled(None, cuda) and not lm._use_compiled(None, cpu)
    assert lm._use_compiled(True, cpu) and not lm._use_compiled(False, cuda)


class _MatmulPrecision(TorchDispatchMode):
    """The CUDA fp32 matmul precision setting in force at each matmul (its output shape, and whether
    it wrote into a given buffer)."""

    MATMULS = ("mm.default", "mm.out", "addmm.default", "addmm_.default", "bmm.default")

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if name in self.MATMULS:
            self.calls.append((name, tuple(out.shape), torch.backends.cuda.matmul.fp32_precision))
        return out


def test_tau_path_matmuls_use_tf32_and_logits_do_not(monkeypatch):
    """On CUDA (emulated: the flag is set, CPU math ignores it) the τ path's fp32 matmuls run in TF32,
    the chunk logits and their gradient matmuls in full fp32, and the setting is restored after."""
    monkeypatch.setattr(lm, "_has_tf32", lambda device: True)
    before = torch.backends.cuda.matmul.fp32_precision
    hidden, weight, labels, tempnet = make_case(n=24)
    with _MatmulPrecision() as mode:
        tempnet_lm_loss(hidden, weight, labels, tempnet, RHO, chunk_size=8).loss.backward()
    assert torch.backends.cuda.matmul.fp32_precision == before != "tf32"
    precision = {}
    for name, shape, setting in mode.calls:
        precision.setdefault((name, shape), set()).add(setting)
    hidden_size = tempnet.first.weight.shape[0]
    assert precision[("mm.default", (D, D))] == {"tf32"}  # Gram matrix W_Uᵀ W_U
    assert precision[("mm.default", (24, D))] == {"tf32"}  # h · Gram
    assert precision[("addmm_.default", (hidden_size, D))] == {"tf32"}  # W1 · W_U
    # TempNet's first layer, from (W1·W_U); its own hidden layer (same shape) stays in full fp32.
    assert "tf32" in precision[("mm.default", (24, hidden_size))]
    assert precision[("mm.default", (hidden_size, V))] == {"tf32"}  # W1's gradient (in backward)
    assert precision[("mm.out", (8, V))] == {before}  # the chunk logits
    assert precision[("mm.out", (8, D))] == {before}  # ∂hidden from the chunk's ∂z
    assert precision[("addmm_.default", (V, D))] == {before}  # ∂W_U accumulation


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_chunked_cross_entropy_matches_torch(chunk_size):
    hidden, weight, labels, _ = make_case(shape=(2, 9))
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
    loss.backward()
    got = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    expected = F.cross_entropy((hidden @ weight.t()).view(-1, V), labels.view(-1), ignore_index=-100)
    expected.backward()
    torch.testing.assert_close(loss, expected, **TIGHT)
    torch.testing.assert_close(got[0], hidden.grad, **TIGHT)
    torch.testing.assert_close(got[1], weight.grad, **TIGHT)


def test_backward_scales_with_upstream_gradient():
    case = make_case(n=12)
    _, grads = loss_and_grads(tempnet_lm_loss, *case)
    _, grads3 = loss_and_grads(lambda *a, **k: _scaled(tempnet_lm_loss(*a, **k), 3.0), *case)
    for name in grads:
        torch.testing.assert_close(grads3[name], 3.0 * grads[name], msg=name, **TIGHT)


def _scaled(out, factor):
    out.loss = out.loss * factor
    return out


def test_second_backward_is_refused():
    out = tempnet_lm_loss(*make_case(n=6), RHO)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        out.loss.backward()


def test_mismatched_vocab_is_a_clear_error():
    hidden, weight, labels, _ = make_case(n=5)
    with pytest.raises(ValueError, match="vocab_size"):
        tempnet_lm_loss(hidden, weight, labels, LMTempNet(V + 1, hidden_size=4).double(), RHO)
    with pytest.raises(ValueError, match="labels"):
        tempnet_lm_loss(hidden, weight, labels[:4], LMTempNet(V, hidden_size=4).double(), RHO)


def test_benchmark_tiny_runs():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "lm_loss.py"), "--tiny"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "fused/naive: memory" in proc.stdout and "fused/full_ce: memory" in proc.stdout
    for variant in ("naive", "fused", "chunked_ce", "full_ce"):
        assert f"\n{variant} " in proc.stdout
