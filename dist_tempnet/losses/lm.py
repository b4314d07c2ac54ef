"""Per-token robust LM loss with TempNet (DESIGN §2.1): a plain reference and a fused, chunked op.

For a token with logits z = W_U·h ∈ R^V, label y and temperature τ = TempNet(z):

    ℓ(z, y, τ) = τ·CE(z/τ, y) + (ρ − log V)·τ,      loss = mean of ℓ over tokens with label ≠ ignore_index

The LM is trained through ℓ with τ held fixed (∂ℓ/∂z = softmax(z/τ) − onehot(y)); TempNet through τ
(∂ℓ/∂τ = H(softmax(z/τ)) + ρ − log V, independent of the label). `naive_tempnet_lm_loss` spells this
out on full N×V logits; `tempnet_lm_loss` gets the same value and gradients without ever holding an
N×V tensor: TempNet's first layer is applied through the d×d Gram matrix of the head, and one pass
over token chunks computes the loss and all gradients at once.

The per-chunk pointwise work has two implementations: a hand-written eager one (the reference, and
the fallback) and a `torch.compile`d kernel that does every pointwise pass over a chunk's logits
(row max, the partition functions at τ and at 1, the entropy for ∂ℓ/∂τ, ∂ℓ/∂z) in one fused
kernel, writing ∂ℓ/∂z over the logits it read. `compiled=None` picks the kernel on CUDA only:
inductor's CPU compile costs tens of seconds for a few percent there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from dist_tempnet.tempnet import LMTempNet

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk; on CPU time is flat from 512 to 4096 (benchmarks/lm_loss.py)

_NORM_EPS = 1e-12  # F.normalize's default, which LMTempNet.forward uses
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_HEAD_ROW_BLOCK = 16384  # rows of W_U upcast at a time where a full-precision copy of W_U is avoidable

CountLike = Union[float, int, Tensor]


@dataclass
class LMLossOutput:
    """Result of the robust LM loss.

    loss: scalar to backpropagate. tau: per-token temperature [N] (detached, fp32; ignored tokens
    included). num_valid: number of tokens with label ≠ ignore_index (int64 scalar). ce: mean plain
    cross-entropy at τ = 1 over valid tokens (detached), for perplexity logging.
    """

    loss: Tensor
    tau: Tensor
    num_valid: Tensor
    ce: Tensor


# ----------------------------------------------------------------------------------------------
# shared helpers


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 when any input is fp64 (the exactness tests)."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _flatten(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree: expected "
            "hidden [..., d] with labels [...] of the same leading shape"
        )
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


def _check_head(weight: Tensor, hidden: Tensor, tempnet: LMTempNet | None) -> None:
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, d] with d = hidden's last dim {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if tempnet is not None and tempnet.vocab_size != weight.shape[0]:
        raise ValueError(
            f"tempnet.vocab_size={tempnet.vocab_size} but lm_head_weight has {weight.shape[0]} rows: "
            "TempNet must read the head's full logit vector"
        )


def _loss_divisor(num_valid: Tensor, loss_scale_count: CountLike | None, dtype: torch.dtype) -> Tensor:
    """What token losses are divided by: the local valid count, or the caller's (global) count.

    A zero divisor means nothing is valid anywhere; every numerator is then 0 too, so divide by 1
    instead of producing NaN.
    """
    count = num_valid if loss_scale_count is None else loss_scale_count
    count = torch.as_tensor(count, dtype=dtype, device=num_valid.device).detach().reshape(())
    return torch.where(count > 0, count, torch.ones_like(count))


def _mean_over_valid(values: Tensor, valid: Tensor, num_valid: Tensor) -> Tensor:
    return torch.where(valid, values, 0).sum() / num_valid.clamp_min(1)


_OUT_DTYPE_MM: dict[str, bool] = {}


def _device_has_out_dtype_mm(device: torch.device) -> bool:
    """Whether torch.mm(bf16, bf16, out_dtype=fp32) runs here (CUDA in recent torch; never CPU).

    Where it does, bf16 operands stay bf16 (tensor cores, no fp32 copy of W_U) while products are
    written in fp32. Probed once per device type.
    """
    if device.type not in _OUT_DTYPE_MM:
        probe = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        try:
            ok = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _OUT_DTYPE_MM[device.type] = ok
    return _OUT_DTYPE_MM[device.type]


def _operand_dtype(a_dtype: torch.dtype, b_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype both matmul operands are cast to so that the product comes out in accumulation precision."""
    acc = _accumulation_dtype(a_dtype, b_dtype)
    if a_dtype == b_dtype and a_dtype in _LOW_PRECISION and _device_has_out_dtype_mm(device):
        return a_dtype
    return acc


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b written in `acc` precision; operands must already share one dtype."""
    if a.dtype == acc:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=acc)
    except (RuntimeError, NotImplementedError) as err:  # a layout the probe didn't cover: stay correct
        warnings.warn(f"mm with out_dtype failed ({err}); upcasting operands instead", stacklevel=2)
        _OUT_DTYPE_MM[a.device.type] = False
        return a.to(acc) @ b.to(acc)


def _mm_into(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out ← a @ b with `out` in accumulation precision (operands share one dtype): the chunk logits
    land in the one buffer reused for every chunk, no temporary."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    try:
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    except (RuntimeError, NotImplementedError) as err:  # a layout the probe didn't cover: stay correct
        warnings.warn(f"mm with out_dtype failed ({err}); upcasting operands instead", stacklevel=2)
        _OUT_DTYPE_MM[a.device.type] = False
        return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


def _has_tf32(device: torch.device) -> bool:
    return device.type == "cuda"


@contextlib.contextmanager
def _tf32_matmuls(device: torch.device) -> Iterator[None]:
    """fp32 matmuls on CUDA use TF32 inside this block (restored after; nothing changes elsewhere).

    For the τ path only: ‖z‖² = hᵀGh, (W1·W_U) and W1's gradient feed TempNet, a smooth function of
    its L2-normalized input, so TF32's relative error (~5e-4 per product, fp32 accumulation) moves τ
    and its gradient by about as little. Never for the chunk logits: at τ ≈ 0.01 an absolute logit
    error of |z|·5e-4 becomes an O(1) error in z/τ.
    """
    if not _has_tf32(device):
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        previous = matmul.fp32_precision
    except RuntimeError:  # the caller set TF32 through the legacy allow_tf32 flag: leave it to them
        yield
        return
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def _row_blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_k a[i,k]·b[i,k] per row, without a third chunk×V temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


# ----------------------------------------------------------------------------------------------
# reference


def naive_tempnet_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    tempnet: LMTempNet,
    rho: float,
    ignore_index: int = -100,
    loss_scale_count: CountLike | None = None,
) -> LMLossOutput:
    """The robust LM loss written directly on full N×V logits (reference for tests and benchmarks).

    Autograd of the definition gives the gradients DESIGN §2.1 asks for: TempNet reads the detached
    logits, so τ's graph never reaches z and ∂ℓ/∂z is taken with τ fixed, while ∂ℓ/∂τ flows into
    TempNet. `loss_scale_count` has the same meaning as in `tempnet_lm_loss`.
    """
    hidden, labels = _flatten(hidden, labels)
    _check_head(lm_head_weight, hidden, tempnet)
    acc = _accumulation_dtype(hidden.dtype, lm_head_weight.dtype)
    logits = hidden.to(acc) @ lm_head_weight.to(acc).t()
    tau = tempnet(logits.detach()).to(acc)
    valid = labels != ignore_index
    targets = torch.where(valid, labels, 0)
    num_valid = valid.sum()
    divisor = _loss_divisor(num_valid, loss_scale_count, acc)

    log_v = math.log(lm_head_weight.shape[0])
    scaled_ce = tau * F.cross_entropy(logits / tau.unsqueeze(1), targets, reduction="none")
    per_token = scaled_ce + (rho - log_v) * tau
    loss = torch.where(valid, per_token, 0).sum() / divisor
    with torch.no_grad():
        ce = _mean_over_valid(F.cross_entropy(logits, targets, reduction="none"), valid, num_valid)
    return LMLossOutput(loss=loss, tau=tau.detach().float(), num_valid=num_valid, ce=ce)


# ----------------------------------------------------------------------------------------------
# fused: TempNet's first layer without logits


class _ProjectThroughHead(torch.autograd.Function):
    """W1 @ W_U ([hidden, V] @ [V, d] -> [hidden, d]) in accumulation precision, gradient for W1 only.

    W_U rows are upcast block by block, so neither the forward nor the saved state for backward holds a
    full-precision copy of a bf16 head. ∂/∂W1 = ∂A · W_Uᵀ is exact: it is what W1 would receive
    through normalize(z) (DESIGN §2.1).
    """

    @staticmethod
    def forward(ctx, first_weight: Tensor, head_weight: Tensor) -> Tensor:
        acc = _accumulation_dtype(first_weight.dtype, head_weight.dtype)
        projected = first_weight.new_zeros(first_weight.shape[0], head_weight.shape[1], dtype=acc)
        with _tf32_matmuls(head_weight.device):
            for rows in _row_blocks(head_weight.shape[0], _HEAD_ROW_BLOCK):
                projected.addmm_(first_weight[:, rows].to(acc), head_weight[rows].to(acc))
        ctx.save_for_backward(head_weight)
        ctx.first_dtype = first_weight.dtype
        return projected

    @staticmethod
    def backward(ctx, grad_projected: Tensor) -> tuple[Tensor, None]:
        (head_weight,) = ctx.saved_tensors
        shape = (grad_projected.shape[0], head_weight.shape[0])
        grad_first = grad_projected.new_empty(shape, dtype=ctx.first_dtype)
        with _tf32_matmuls(head_weight.device):  # runs in backward, outside tempnet_tau_from_hidden
            for rows in _row_blocks(head_weight.shape[0], _HEAD_ROW_BLOCK):
                grad_first[:, rows] = grad_projected @ head_weight[rows].to(grad_projected.dtype).t()
        return grad_first, None


def _head_gram(head_weight: Tensor, acc: torch.dtype) -> Tensor:
    """W_Uᵀ W_U (d×d) in accumulation precision: ‖z‖² = hᵀ(W_Uᵀ W_U)h without forming z."""
    operand = _operand_dtype(head_weight.dtype, head_weight.dtype, head_weight.device)
    d = head_weight.shape[1]
    gram = head_weight.new_zeros(d, d, dtype=acc)
    for rows in _row_blocks(head_weight.shape[0], _HEAD_ROW_BLOCK):
        block = head_weight[rows].to(operand)
        gram += _mm(block.t(), block, acc)
    return gram


def tempnet_tau_from_hidden(hidden: Tensor, lm_head_weight: Tensor, tempnet: LMTempNet) -> Tensor:
    """τ = tempnet(hidden @ W_Uᵀ) for hidden [N, d], without forming the N×V logits.

    W1·normalize(z) = (W1·W_U)·h / ‖z‖ with ‖z‖² = hᵀ(W_Uᵀ W_U)h: O(N·d·(d + hidden) + hidden·d·V)
    instead of O(N·V·hidden). Gradient reaches TempNet's parameters only (h and W_U are detached, as
    TempNet reads detached logits). Exact in real arithmetic; in floating point ‖z‖ via the Gram
    matrix loses relative accuracy only when ‖z‖ ≪ ‖W_U‖·‖h‖. On CUDA its fp32 matmuls use TF32.
    """
    first = tempnet.first
    acc = _accumulation_dtype(hidden.dtype, lm_head_weight.dtype, first.weight.dtype)
    head = lm_head_weight.detach()
    h = hidden.detach().to(acc)
    with _tf32_matmuls(head.device):  # the Gram matrix itself has bf16 operands where inputs are bf16
        sq_norm = ((h @ _head_gram(head, acc)) * h).sum(-1).clamp_min(0)  # rounding can dip below 0
        inv_norm = 1.0 / sq_norm.sqrt().clamp_min(_NORM_EPS)
        pre = (h * inv_norm.unsqueeze(1)) @ _ProjectThroughHead.apply(first.weight, head).t()
    if first.bias is not None:
        pre = pre + first.bias.to(acc)
    return tempnet.tau_from_first_layer(pre)  # fp32 (fp64 in the exactness tests), never bf16


# ----------------------------------------------------------------------------------------------
# fused: one pass over token chunks


class _HeadPass:
    """State of one chunked pass against the LM head: chunk logits in accumulation precision, and the
    gradients w.r.t. hidden and W_U accumulated eagerly from each chunk's ∂loss/∂z.

    Holds one chunk×V logits buffer that every chunk's matmul writes into (`out=`), the gradient
    buffers (N×d, V×d), where operands are bf16 a chunk×V bf16 buffer for ∂z (the backward matmuls'
    operand), and, only where the device cannot write fp32 products from bf16 operands (CPU), an
    fp32 copy of a bf16 head so the chunks don't each repeat the cast.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, chunk_size: int, need_dh: bool, need_dw: bool) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.acc = _accumulation_dtype(hidden.dtype, weight.dtype)
        self.operand = _operand_dtype(hidden.dtype, weight.dtype, hidden.device)
        self.hidden = hidden
        self.weight = weight.to(self.operand)
        self.hidden_dtype, self.weight_dtype = hidden.dtype, weight.dtype
        self.chunk_size = chunk_size
        n, d = hidden.shape
        vocab = weight.shape[0]
        self.vocab = vocab
        self.grad_hidden = hidden.new_zeros(n, d, dtype=self.acc) if need_dh else None
        self.grad_weight = hidden.new_zeros(vocab, d, dtype=self.acc) if need_dw else None
        self.rows = min(chunk_size, n)  # rows of every buffer: the last chunk may use fewer
        self.buffer = hidden.new_empty(self.rows, vocab, dtype=self.acc)
        needs_grad = need_dh or need_dw
        separate = needs_grad and self.operand != self.acc
        # Where ∂z is a matmul operand in bf16 it cannot overwrite the fp32 logits it is computed from.
        self.grad_buffer = hidden.new_empty(self.rows, vocab, dtype=self.operand) if separate else None

    def chunks(self) -> Iterator[slice]:
        return _row_blocks(self.hidden.shape[0], self.chunk_size)

    def logits(self, rows: slice) -> Tensor:
        """This chunk's logits, written into the shared buffer (a view of its first rows)."""
        h = self.hidden[rows].to(self.operand)
        return _mm_into(h, self.weight.t(), self.buffer[: h.shape[0]])

    def backprop(self, rows: slice, grad_logits: Tensor) -> None:
        """Add a chunk's ∂loss/∂z (already divided by the token count) to the hidden and head grads."""
        if grad_logits.dtype == self.operand:
            g = grad_logits
        else:  # the eager path's fp32 ∂z, cast into the reused operand buffer
            g = self.grad_buffer[: grad_logits.shape[0]].copy_(grad_logits)
        if self.grad_hidden is not None:
            _mm_into(g, self.weight, self.grad_hidden[rows])
        if self.grad_weight is None:
            return
        h = self.hidden[rows].to(self.operand)
        if self.operand == self.acc:
            self.grad_weight.addmm_(g.t(), h)
            return
        for vocab_rows in _row_blocks(self.vocab, _HEAD_ROW_BLOCK):  # bounds the fp32 temporary
            self.grad_weight[vocab_rows] += _mm(g[:, vocab_rows].t(), h, self.acc)

    def grads(self) -> tuple[Tensor | None, Tensor | None]:
        dh = None if self.grad_hidden is None else self.grad_hidden.to(self.hidden_dtype)
        dw = None if self.grad_weight is None else self.grad_weight.to(self.weight_dtype)
        return dh, dw


def _shift_by_row_max_(logits: Tensor, targets: Tensor) -> Tensor:
    """In place z ← z − max_k z_k (so exp never overflows); returns the shifted target logit."""
    logits.sub_(logits.amax(dim=1, keepdim=True))
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1)


def _probs_to_grad_(probs: Tensor, targets: Tensor, row_scale: Tensor) -> Tensor:
    """In place p ← (p − onehot(y))·row_scale; row_scale is 0 on ignored tokens."""
    probs.scatter_add_(1, targets.unsqueeze(1), -torch.ones_like(row_scale).unsqueeze(1))
    return probs.mul_(row_scale.unsqueeze(1))


def _saved_grads_times(ctx, grad_out: Tensor) -> list[Tensor | None]:
    """The gradients computed in forward, scaled in place by the upstream gradient.

    In place because a copy would cost another V×d + N×d; the price is that the graph can be
    backpropagated only once (retain_graph=True and a second backward is refused).
    """
    if ctx.grads is None:
        raise RuntimeError("the fused LM loss computes its gradients once; it cannot be backpropagated twice")
    grads, ctx.grads = ctx.grads, None
    return [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]


def _chunk_kernel(
    logits: Tensor,
    targets: Tensor,
    valid: Tensor,
    tau: Tensor,
    row_scale: Tensor,
    rho_term: float,
    grad_out: Tensor | None,
    write_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's loss sum, plain-CE sum and ∂loss/∂τ; with `write_grad`, ∂loss/∂z is written into
    `grad_out` (or over `logits` when None). rho_term = ρ − log V.

    Written for `torch.compile`: inductor fuses it into one kernel that reads the chunk a few times
    and writes ∂z once, with no chunk×V temporary (the eager path makes ~18 passes). Every
    chunk-sized expression is recomputed from `logits` where it is used (∂z takes p = exp(u − log Σe^u),
    not e^u / Σe^u) so that inductor has no reason to store one. Rows with valid = False (ignored
    tokens, and the padding rows of a short last chunk, whose buffer rows hold stale data) read as
    zeros and contribute nothing.
    """
    z = torch.where(valid.unsqueeze(1), logits, 0.0)
    shifted = z - z.amax(dim=1, keepdim=True)
    target = shifted.gather(1, targets.unsqueeze(1)).squeeze(1)
    log_z1 = shifted.exp().sum(1).log()  # τ = 1 partition function, for the plain-CE metric
    u = shifted / tau.unsqueeze(1)
    e = u.exp()
    partition = e.sum(1)
    log_z = partition.log()
    loss_sum = torch.where(valid, tau * log_z - target + rho_term * tau, 0.0).sum()
    ce_sum = torch.where(valid, log_z1 - target, 0.0).sum()
    entropy = log_z - (e * u).sum(1) / partition
    grad_tau = (entropy + rho_term) * row_scale
    if write_grad:
        p = torch.exp(u - log_z.unsqueeze(1))
        onehot = torch.arange(z.shape[1], device=z.device) == targets.unsqueeze(1)
        grad = torch.where(onehot, p - 1.0, p) * row_scale.unsqueeze(1)
        (logits if grad_out is None else grad_out).copy_(grad)
    return loss_sum, ce_sum, grad_tau


@functools.cache
def _compiled_chunk_kernel() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    # dynamic=False: every chunk has the buffer's shape (a short last chunk is padded), so a run
    # compiles once per (rows, V, dtype, write_grad).
    logger.info("LM loss: the chunk kernel is compiled with torch.compile at its first call per shape")
    return torch.compile(_chunk_kernel, dynamic=False, fullgraph=True)


_COMPILE_FAILED: set[str] = set()  # device types where the kernel failed to compile: eager from then on


def _use_compiled(compiled: bool | None, device: torch.device) -> bool:
    """None (auto) compiles on CUDA only: on CPU inductor's compile costs tens of seconds per shape."""
    wanted = device.type == "cuda" if compiled is None else bool(compiled)
    return wanted and device.type not in _COMPILE_FAILED


def _padded(values: Tensor, length: int, fill: float | bool) -> Tensor:
    """values extended to `length` entries with `fill` (the padding rows of a short last chunk)."""
    if values.shape[0] == length:
        return values
    return torch.cat([values, values.new_full((length - values.shape[0],), fill)])


def _eager_chunk(
    logits: Tensor, probs: Tensor, targets: Tensor, valid: Tensor, tau: Tensor, row_scale: Tensor,
    rho_term: float, need_dtau: bool, need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """The reference chunk computation, in place on `logits` and `probs` (a second chunk×V buffer)."""
    shifted_target = _shift_by_row_max_(logits, targets)
    torch.exp(logits, out=probs)
    log_z1 = probs.sum(1).log()  # τ = 1 partition function, for the plain-CE metric
    u = logits.div_(tau.unsqueeze(1))
    torch.exp(u, out=probs)
    partition = probs.sum(1)
    log_z = partition.log()
    token_loss = tau * log_z - shifted_target + rho_term * tau
    loss_sum = torch.where(valid, token_loss, 0).sum()
    ce_sum = torch.where(valid, log_z1 - shifted_target, 0).sum()
    grad_tau = grad = None
    if need_dtau:
        entropy = log_z - _row_dot(probs, u) / partition
        grad_tau = (entropy + rho_term) * row_scale
    if need_grad:
        probs.div_(partition.unsqueeze(1))
        grad = _probs_to_grad_(probs, targets, row_scale)
    return loss_sum, ce_sum, grad_tau, grad


def _compiled_chunk(
    head: _HeadPass, rows: slice, padded: tuple[Tensor, Tensor, Tensor, Tensor], rho_term: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None] | None:  # fmt: skip
    """The chunk through the compiled kernel over the full buffer; None if the kernel cannot compile
    here (the caller then runs the eager path, as on every later call on this device type)."""
    from torch._dynamo.exc import TorchDynamoException

    head.logits(rows)
    n = rows.stop - rows.start
    block = slice(rows.start, rows.start + head.rows)
    targets, valid, tau, row_scale = (t[block] for t in padded)
    grad_out = head.grad_buffer  # None: ∂z overwrites the fp32 logits
    try:
        loss_sum, ce_sum, grad_tau = _compiled_chunk_kernel()(
            head.buffer, targets, valid, tau, row_scale, rho_term, grad_out, need_grad
        )
    except TorchDynamoException as err:
        logger.warning(
            "torch.compile of the LM loss chunk kernel failed on %s (%s); using the eager path",
            head.buffer.device.type,
            err,
        )
        _COMPILE_FAILED.add(head.buffer.device.type)
        return None
    grad = None
    if need_grad:
        grad = (head.buffer if grad_out is None else grad_out)[:n]
    return loss_sum, ce_sum, grad_tau[:n], grad


class _FusedTempNetLM(torch.autograd.Function):
    """Loss and all gradients of the robust LM loss in one chunked pass, τ given.

    Per chunk (fp32 logits, shifted by the row max): u = (z − max)/τ, p = softmax(u),
    ℓ = τ·log Σ e^u − (z_y − max) + (ρ − log V)·τ, ∂z = (p − onehot)·valid/count,
    ∂τ = (H(p) + ρ − log V)·valid/count. Backward only scales the saved gradients.
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, tau, labels, divisor, rho, chunk_size, ignore_index, grad_enabled, compiled
    ):
        need_dh, need_dw, need_dtau = (grad_enabled and needed for needed in ctx.needs_input_grad[:3])
        need_grad = need_dh or need_dw
        head = _HeadPass(hidden, weight, chunk_size, need_dh, need_dw)
        acc = head.acc
        valid_all = labels != ignore_index
        targets_all = torch.where(valid_all, labels, 0)
        tau_acc = tau.detach().to(acc)
        rho_term = rho - math.log(weight.shape[0])
        grad_tau = torch.zeros_like(tau_acc)
        loss_sum = hidden.new_zeros((), dtype=acc)
        ce_sum = hidden.new_zeros((), dtype=acc)
        scale_all = valid_all.to(acc) / divisor
        padded = None
        if _use_compiled(compiled, hidden.device):
            n = hidden.shape[0]
            length = -(-n // head.rows) * head.rows if n else 0  # whole buffers
            padded = (
                _padded(targets_all, length, 0),
                _padded(valid_all, length, False),
                _padded(tau_acc, length, 1.0),
                _padded(scale_all, length, 0.0),
            )

        probs_buffer = None  # the eager path's second chunk×V buffer
        for rows in head.chunks():
            out = None
            if padded is not None and hidden.device.type not in _COMPILE_FAILED:
                out = _compiled_chunk(head, rows, padded, rho_term, need_grad)
            if out is None:
                if probs_buffer is None:
                    probs_buffer = torch.empty_like(head.buffer)
                logits = head.logits(rows)
                chunk = (targets_all[rows], valid_all[rows], tau_acc[rows], scale_all[rows])
                probs = probs_buffer[: logits.shape[0]]
                out = _eager_chunk(logits, probs, *chunk, rho_term, need_dtau, need_grad)
            chunk_loss, chunk_ce, chunk_grad_tau, grad = out
            loss_sum += chunk_loss
            ce_sum += chunk_ce
            if need_dtau:
                grad_tau[rows] = chunk_grad_tau
            if need_grad:
                head.backprop(rows, grad)

        dh, dw = head.grads()
        ctx.grads = (dh, dw, grad_tau.to(tau.dtype) if need_dtau else None)
        ctx.mark_non_differentiable(ce_sum)
        return loss_sum / divisor, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        return (*_saved_grads_times(ctx, grad_loss), None, None, None, None, None, None, None)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Plain cross-entropy on the head's logits, chunked with the same eager-gradient pass."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, chunk_size, ignore_index, grad_enabled):
        need_dh, need_dw = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        head = _HeadPass(hidden, weight, chunk_size, need_dh, need_dw)
        valid_all = labels != ignore_index
        targets_all = torch.where(valid_all, labels, 0)
        loss_sum = hidden.new_zeros((), dtype=head.acc)
        for rows in head.chunks():
            valid, targets = valid_all[rows], targets_all[rows]
            logits = head.logits(rows)
            shifted_target = _shift_by_row_max_(logits, targets)
            probs = logits.exp_()
            partition = probs.sum(1)
            loss_sum += torch.where(valid, partition.log() - shifted_target, 0).sum()
            if need_dh or need_dw:
                probs.div_(partition.unsqueeze(1))
                head.backprop(rows, _probs_to_grad_(probs, targets, valid.to(head.acc) / divisor))
        ctx.grads = head.grads()
        return loss_sum / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_saved_grads_times(ctx, grad_loss), None, None, None, None, None)


def tempnet_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    tempnet: LMTempNet,
    rho: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    loss_scale_count: CountLike | None = None,
    compiled: bool | None = None,
) -> LMLossOutput:
    """Fused, chunked robust LM loss (DESIGN §2.1): same value and gradients as
    `naive_tempnet_lm_loss`, never holding N×V logits, softmax or TempNet input.

    hidden: [B, T, d] or [N, d] final hidden states (already shifted to align with labels); bf16 is
    fine, logits are computed with fp32 output. lm_head_weight: [V, d] (no head bias). labels: [B, T]
    or [N]. tempnet: an LMTempNet over V; in train mode its dropout is applied as usual.
    chunk_size: tokens per chunk; memory is one chunk_size×V fp32 logits buffer (two on the eager
    path; plus a bf16 one for ∂z where operands are bf16) plus the V×d fp32 head-gradient accumulator.
    compiled: run each chunk's pointwise work through the `torch.compile`d kernel (True), the eager
    reference (False), or decide by device (None: compile on CUDA only). A kernel that fails to
    compile logs a warning and the eager path takes over.

    loss_scale_count: what the summed token losses are divided by; default the number of valid
    tokens here. Under data parallelism pass `global_valid_count / world_size`, where
    global_valid_count is this step's valid-token count all-reduced (SUM) over ranks: each rank's
    loss is then Σ_local ℓ · world_size / global_count, so the gradient average DDP/DeepSpeed takes
    is exactly the gradient of the global mean (and the mean of the ranks' loss values is the global
    mean loss). Ranks with no valid tokens contribute zero.

    Returns LMLossOutput(loss, tau [N] detached fp32, num_valid (local), ce: local mean plain CE).
    """
    hidden, labels = _flatten(hidden, labels)
    _check_head(lm_head_weight, hidden, tempnet)
    tau = tempnet_tau_from_hidden(hidden, lm_head_weight, tempnet)
    acc = _accumulation_dtype(hidden.dtype, lm_head_weight.dtype)
    num_valid = (labels != ignore_index).sum()
    divisor = _loss_divisor(num_valid, loss_scale_count, acc)
    loss, ce_sum = _FusedTempNetLM.apply(
        hidden,
        lm_head_weight,
        tau,
        labels,
        divisor,
        float(rho),
        int(chunk_size),
        ignore_index,
        torch.is_grad_enabled(),  # under no_grad (eval) skip the gradient work; needs_input_grad can't tell
        compiled,
    )
    ce = ce_sum / num_valid.clamp_min(1)
    return LMLossOutput(loss=loss, tau=tau.detach().float(), num_valid=num_valid, ce=ce)


def chunked_cross_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = -100,
    loss_scale_count: CountLike | None = None,
) -> Tensor:
    """Mean cross-entropy of hidden @ W_Uᵀ over valid tokens, without N×V logits (no TempNet).

    The plain-CE baseline of training and benchmarks; same shapes, dtypes and `loss_scale_count`
    meaning as `tempnet_lm_loss`.
    """
    hidden, labels = _flatten(hidden, labels)
    _check_head(lm_head_weight, hidden, None)
    acc = _accumulation_dtype(hidden.dtype, lm_head_weight.dtype)
    divisor = _loss_divisor((labels != ignore_index).sum(), loss_scale_count, acc)
    return _ChunkedCrossEntropy.apply(
        hidden, lm_head_weight, labels, divisor, int(chunk_size), ignore_index, torch.is_grad_enabled()
    )
