"""Skipping an optimizer step whose loss was not finite, at every ZeRO stage and accumulation.

The decision is taken once per optimizer step, after every micro-batch's forward, from one
all-reduced flag (one host sync per step). Every micro-batch still runs its backward, because
DeepSpeed counts micro-steps and reduces gradients in `backward()`; a skipped step then leaves the
weights, the optimizer state and the lr schedule exactly as they were, the way DeepSpeed skips an
fp16 overflow: ZeRO-1/2/3 and the bf16 optimizer see the non-finite gradient norm, discard the
gradients, count the step in `skipped_steps` and do not advance the lr scheduler. A plain torch
optimizer (ZeRO-0, fp32) has no such path: its gradients are dropped and the same counters advanced
here.
"""

from __future__ import annotations

import torch

from dist_tempnet import comm


def any_rank(flag: torch.Tensor) -> bool:
    """Whether `flag` (a bool tensor, kept on the device) is set on any rank: the step's one sync."""
    return bool(comm.all_reduce_sum(flag.to(torch.float32).reshape(1)).item() > 0)


def poisoned(loss: torch.Tensor) -> torch.Tensor:
    """`loss` scaled by NaN: every gradient of its backward is NaN, so the gradient norm DeepSpeed
    computes at the boundary is not finite on any rank and its overflow path discards the step."""
    return loss * float("nan")


def skip_optimizer_step(engine) -> None:
    """Finish the accumulation boundary (after the last micro-batch's backward) without an update."""
    if hasattr(engine.optimizer, "overflow"):
        engine.step()
        if engine.was_step_applied():
            raise RuntimeError(
                "DeepSpeed applied an optimizer step with non-finite gradients (is "
                "zero_optimization.compute_grad_norm=false in deepspeed.extra?); the weights are not usable"
            )
        return
    # What DeepSpeed's engine.step() does at a boundary whose update overflowed, minus the update.
    engine.zero_grad()
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.skipped_steps += 1
