"""Generation with TempNet: each step's logits are divided by the τ TempNet predicts from them.

`TempNetLogitsProcessor` works with any transformers `model.generate(..., logits_processor=[...])`;
`dist-tempnet generate` loads an exported model directory and prints the continuation, optionally
with the τ of every generated token.

Order within one decoding step (transformers' `_get_logits_processor` puts user processors after
the generation config's logits *processors* and before its *warpers*):

    raw logits z → generation-config processors (repetition penalty, min-length / bad-words masks, ...)
                 → TempNet: z / τ(z)
                 → generation-config warpers: temperature T, top-k, top-p, min-p, ... → sampling

so the model card's sampling settings compose with TempNet as softmax(z / (τ(z)·T)) truncated by
top-k/top-p, i.e. τ plays the role the paper gives it (a per-token temperature of the raw logits)
and the card's temperature scales it. TempNet reads the logits before temperature and truncation
(what it was trained on); tokens a processor masked to -inf are shown to TempNet as the row's
smallest finite logit (TempNet's normalization cannot take -inf) and stay -inf in the output.
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
        x = scores
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            row_min = torch.where(finite, x, torch.full_like(x, float("inf"))).amin(dim=-1, keepdim=True)
            x = torch.where(finite, x, row_min)
        tau = self.tempnet(x.to(param.device, param.dtype)).to(scores.device, scores.dtype)
        if self.record:
            self.taus.append(tau.detach().float().cpu())
        return scores / tau.unsqueeze(-1)
