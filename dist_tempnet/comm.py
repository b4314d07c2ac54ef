"""The few collectives the losses use, as thin wrappers over torch.distributed.

Every function is a no-op (or the identity) at world size 1, including when torch.distributed is
not initialized, so the same loss code runs in a single CPU process, under gloo and under NCCL.
Nothing here assumes a device: tensors stay where the caller put them (NCCL needs CUDA tensors,
gloo takes either).

Each collective adds the bytes of the tensor this rank *passes in* to a module-level counter
(`bytes_sent()` / `reset_bytes()`), so benchmarks can report communication per step. This is the
payload handed to the collective, not the wire traffic of a particular algorithm (a ring all-reduce
moves about 2·(K−1)/K times its input). Nothing is counted at world size 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_bytes_sent = 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def bytes_sent() -> int:
    """Bytes this rank has passed to collectives since the last `reset_bytes()`."""
    return _bytes_sent


def reset_bytes() -> None:
    global _bytes_sent
    _bytes_sent = 0


def _count(t: torch.Tensor) -> None:
    global _bytes_sent
    _bytes_sent += t.numel() * t.element_size()


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    # The list form of all_gather works on every backend and torch version we support; the
    # single-tensor variants were renamed across versions.
    t = t.contiguous()
    _count(t)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 (rank order), outside autograd.

    All ranks must pass tensors of the same shape and dtype.
    """
    if not is_distributed():
        return t.detach()
    with torch.no_grad():
        return _all_gather_cat(t.detach())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks, returned as a new tensor (`t` is left untouched)."""
    if not is_distributed():
        return t.detach().clone()
    out = t.detach().clone().contiguous()
    _count(out)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank its slice of the gradient summed over ranks.

    Every rank's loss may depend on every rank's features, so the gradient that belongs to this
    rank's input is the sum over ranks of the gradient w.r.t. its slice of the gathered tensor.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = t.shape[0]
        return _all_gather_cat(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        _count(grad)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenation of all ranks' `t` (dim 0) that backpropagates into this rank's `t`.

    Backward all-reduces (SUM) the gradient of the gathered tensor and returns this rank's rows, the
    correct gradient when each rank's loss uses all ranks' features. It costs a second exchange of
    the full gathered size in backward; the DRO loss avoids it (see losses/contrastive.py).
    """
    if not is_distributed():
        return t
    return _GatherWithGrad.apply(t)


def batch_offset(local_batch: int) -> int:
    """Position of this rank's first sample in the gathered (rank-ordered) global batch."""
    return rank() * local_batch
