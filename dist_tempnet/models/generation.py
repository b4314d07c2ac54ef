"""Generation with TempNet: each step's logits are divided by the τ TempNet predicts from them.

`TempNetLogitsProcessor` works with any transformers `model.generate(...)`; `dist-tempnet generate`
loads an exported model directory (see export.py) and prints the continuation, optionally with
the τ of every generated token.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from dist_tempnet.tempnet import LMTempNet


class TempNetLogitsProcessor(LogitsProcessor):
    """scores / τ(scores) per sequence; τ of each step is kept in `self.taus` (list of [batch])."""

    def __init__(self, tempnet: LMTempNet, record: bool = True) -> None:
        self.tempnet = tempnet.eval()
        self.record = record
        self.taus: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        param = next(self.tempnet.parameters())
        tau = self.tempnet(scores.to(param.device, param.dtype)).to(scores.device, scores.dtype)
        if self.record:
            self.taus.append(tau.detach().float().cpu())
        return scores / tau.unsqueeze(-1)
