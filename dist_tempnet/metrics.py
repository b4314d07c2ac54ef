"""Evaluation metrics: zero-shot classification, image↔text retrieval recall@k, perplexity.

The metric functions are pure (embeddings in, numbers out) so they are tested on hand-made cases;
the distributed drivers feed them embeddings gathered from every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from dist_tempnet import comm


def class_text_embeddings(per_template: torch.Tensor) -> torch.Tensor:
    """[C, T, d] embeddings of every (class, prompt template) → one normalized row per class.

    Averages the normalized template embeddings (CLIP's prompt ensembling)."""
    return F.normalize(F.normalize(per_template.float(), dim=-1).mean(dim=1), dim=-1)


def zero_shot_predictions(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """[N] index of the class whose text embedding is closest to each image."""
    return (F.normalize(image_emb.float(), dim=-1) @ class_emb.float().t()).argmax(dim=-1)


def zero_shot_correct(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> int:
    return int((zero_shot_predictions(image_emb, class_emb) == labels).sum())


def recall_at_k(
    query: torch.Tensor, gallery: torch.Tensor, ks: Iterable[int] = (1, 5, 10)
) -> dict[int, float]:
    """Query i's true match is gallery i. Recall@k = share of queries whose match ranks in the top k.

    Ties count against the query (a match only counts when strictly fewer items score higher)."""
    sims = F.normalize(query.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).t()
    true = sims.diagonal().unsqueeze(1)
    rank = (sims >= true).sum(dim=1) - 1  # 0 = best; the match itself is the one subtracted
    return {k: float((rank < k).float().mean()) for k in ks}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    out = {}
    for k, v in recall_at_k(image_emb, text_emb, ks).items():
        out[f"i2t_recall_at_{k}"] = v
    for k, v in recall_at_k(text_emb, image_emb, ks).items():
        out[f"t2i_recall_at_{k}"] = v
    return out


def perplexity(total_nll: float, num_tokens: int) -> float:
    return math.exp(total_nll / max(1, num_tokens)) if num_tokens else float("nan")


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Gather a [n_r, ...] tensor from every rank when n_r differs between ranks (pads, then trims)."""
    if comm.world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = comm.gather_no_grad(n).tolist()
    pad = max(sizes) - t.shape[0]
    padded = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
    parts = comm.gather_no_grad(padded).split(max(sizes))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def lockstep(
    batches: Iterator[dict[str, Any]], device: torch.device
) -> Iterator[tuple[dict[str, Any], bool]]:
    """Yield (batch, is_real) until every rank is exhausted.

    Under ZeRO-3 every forward gathers parameters collectively, so all ranks must run the same
    number of forwards: a rank that ran out repeats its last batch and discards the result.
    """
    last = None
    for_all = comm.world_size() > 1
    while True:
        batch = next(batches, None)
        has = torch.tensor([0.0 if batch is None else 1.0], device=device)
        any_left = comm.all_reduce_sum(has).item() > 0 if for_all else batch is not None
        if not any_left:
            return
        if batch is None:
            if last is None:
                raise RuntimeError(
                    "this rank received no evaluation data at all; use fewer workers or more eval shards"
                )
            yield last, False
        else:
            last = batch
            yield batch, True
