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
    hits = _t2i_hits(query, gallery, torch.arange(query.shape[0], device=query.device), tuple(ks), 4096)
    return {k: float(h) / max(1, query.shape[0]) for k, h in hits.items()}


def _t2i_hits(
    texts: torch.Tensor, images: torch.Tensor, text_image: torch.Tensor, ks: tuple[int, ...], chunk: int
) -> dict[int, int]:
    """Per k: how many texts (queries) have their own image among the top k images."""
    texts, images = F.normalize(texts.float(), dim=-1), F.normalize(images.float(), dim=-1)
    hits = dict.fromkeys(ks, 0)
    for start in range(0, texts.shape[0], chunk):  # memory O(chunk x gallery)
        sims = texts[start : start + chunk] @ images.t()
        own = text_image[start : start + chunk].to(sims.device)
        true = sims.gather(1, own.unsqueeze(1))
        rank = (sims >= true).sum(dim=1) - 1  # ties count against the query
        for k in ks:
            hits[k] += int((rank < k).sum())
    return hits


def _i2t_hits(
    images: torch.Tensor,
    texts: torch.Tensor,
    text_image: torch.Tensor,
    image_offset: int,
    ks: tuple[int, ...],
    chunk: int,
) -> dict[int, int]:
    """Per k: how many images (queries; global indices from ``image_offset``) have ANY of their
    captions among the top k captions."""
    images, texts = F.normalize(images.float(), dim=-1), F.normalize(texts.float(), dim=-1)
    text_image = text_image.to(texts.device)
    hits = dict.fromkeys(ks, 0)
    for start in range(0, images.shape[0], chunk):
        sims = images[start : start + chunk] @ texts.t()  # [c, captions]
        index = torch.arange(start, start + sims.shape[0], device=sims.device) + image_offset
        own = text_image.unsqueeze(0) == index.unsqueeze(1)
        best = sims.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
        rank = ((sims >= best) & ~own).sum(dim=1)  # other captions scoring at least the best own one
        for k in ks:
            hits[k] += int((rank < k).sum())
    return hits


def multi_caption_retrieval(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Image↔text recall@k with several captions per image (Flickr30k/COCO: 5).

    ``text_image[j]`` is the index of caption j's image. t2i R@k: the caption's own image is in
    the top k images; i2t R@k: any of the image's captions is in the top k captions. Queries are
    processed in chunks against the whole gallery (memory O(chunk x gallery)); under
    torch.distributed each rank takes a contiguous slice of the queries and the hit counts are
    summed, so no rank does the full n x n work.
    """
    ks = tuple(ks)
    if text_image.shape[0] != text_emb.shape[0]:
        raise ValueError(f"text_image has {text_image.shape[0]} entries for {text_emb.shape[0]} captions")
    world, rank = comm.world_size(), comm.rank()
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    i0, i1 = n_img * rank // world, n_img * (rank + 1) // world
    t0, t1 = n_txt * rank // world, n_txt * (rank + 1) // world
    i2t = _i2t_hits(image_emb[i0:i1], text_emb, text_image, i0, ks, chunk_size)
    t2i = _t2i_hits(text_emb[t0:t1], image_emb, text_image[t0:t1], ks, chunk_size)
    counts = torch.tensor([*i2t.values(), *t2i.values()], dtype=torch.float64, device=image_emb.device)
    if world > 1:
        counts = comm.all_reduce_sum(counts)
    out = {}
    for j, k in enumerate(ks):
        out[f"i2t_recall_at_{k}"] = float(counts[j]) / max(1, n_img)
        out[f"t2i_recall_at_{k}"] = float(counts[len(ks) + j]) / max(1, n_txt)
    return out


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """One caption per image (caption i belongs to image i)."""
    index = torch.arange(text_emb.shape[0], device=text_emb.device)
    return multi_caption_retrieval(image_emb, text_emb, index, ks)


def zero_shot_topk(
    image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)
) -> dict[int, int]:
    """Per k: how many images have their label among the k best-scoring classes."""
    logits = F.normalize(image_emb.float(), dim=-1) @ class_emb.float().t()
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    correct = top == labels.to(top.device).unsqueeze(1)
    return {k: int(correct[:, :k].any(dim=1).sum()) for k in ks}


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
