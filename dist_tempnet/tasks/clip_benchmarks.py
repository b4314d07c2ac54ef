"""Standard CLIP benchmarks: zero-shot classification and multi-caption image↔text retrieval.

Configured under ``eval.`` (``zero_shot_path``, ``classnames``, ``templates``, ``retrieval_path``,
``retrieval_images``, ``retrieval_split``); run by training every ``eval.every`` steps and by
``dist-tempnet eval`` on a checkpoint or an exported model. The encoders are passed in as two
functions, so a DeepSpeed engine and a plain transformers model are evaluated by the same code.

Distributed: images are split across ranks; class prompts are encoded in batches; retrieval
embeddings are gathered and each rank ranks its slice of the queries (metrics.multi_caption_retrieval).
Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_tempnet import comm
from dist_tempnet.config import EvalConfig
from dist_tempnet.data import eval_batches, resolve_manifest
from dist_tempnet.data.collate import pin_memory_for
from dist_tempnet.data.eval_sets import (
    image_folder,
    image_loader,
    karpathy_split,
    load_classnames,
    load_templates,
    shard_retrieval_set,
)
from dist_tempnet.data.sources import is_remote
from dist_tempnet.metrics import (
    class_text_embeddings,
    gather_rows,
    lockstep,
    multi_caption_retrieval,
    zero_shot_topk,
)

logger = logging.getLogger(__name__)

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]  # uint8 [B, 3, S, S] on device -> [B, d] normalized
TextEncoder = Callable[[list[str]], torch.Tensor]  # captions -> [B, d] normalized


@dataclass
class BenchmarkContext:
    encode_images: ImageEncoder
    encode_texts: TextEncoder
    image_size: int
    batch_size: int
    num_workers: int
    device: torch.device
    rank: int = 0
    world: int = 1
    caption_key: str = "txt"
    tokenizer: Any = None  # for shard-based zero-shot (eval_batches needs one)
    max_text_len: int = 77


def _is_image_folder(path: str) -> bool:
    p = Path(path)
    return (
        not is_remote(path)
        and p.is_dir()
        and not (p / "dataset.json").exists()
        and not any(p.glob("*.tar"))
        and any(d.is_dir() for d in p.iterdir())
    )


def _loader(ctx: BenchmarkContext, files: list[str]) -> tuple[torch.utils.data.DataLoader, int]:
    pin = pin_memory_for(ctx.device)  # uint8 batches, copied non_blocking in _embed_batches
    return image_loader(files, ctx.image_size, ctx.batch_size, ctx.num_workers, ctx.rank, ctx.world, pin)


def _embed_batches(ctx: BenchmarkContext, batches: Iterator[torch.Tensor]) -> torch.Tensor:
    """Image embeddings of this rank's batches, in lockstep with the other ranks."""
    out = []
    for pixels, real in lockstep(batches, ctx.device):
        emb = ctx.encode_images(pixels.to(ctx.device, non_blocking=True))
        if real:
            out.append(emb.float())
    return torch.cat(out) if out else torch.zeros(0, 1, device=ctx.device)


def encode_texts_batched(ctx: BenchmarkContext, texts: list[str]) -> torch.Tensor:
    """Text embeddings in batches of ``ctx.batch_size`` (never all prompts in one forward)."""
    parts = [
        ctx.encode_texts(texts[i : i + ctx.batch_size]).float() for i in range(0, len(texts), ctx.batch_size)
    ]
    return torch.cat(parts)


def class_embeddings(ctx: BenchmarkContext, classnames: list[str], templates: list[str]) -> torch.Tensor:
    prompts = [t.format(c) for c in classnames for t in templates]
    per_template = encode_texts_batched(ctx, prompts).view(len(classnames), len(templates), -1)
    return class_text_embeddings(per_template)


def zero_shot(ctx: BenchmarkContext, cfg: EvalConfig) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy on an ImageFolder tree or on shards with a ``cls`` field."""
    path = cfg.zero_shot_path
    if _is_image_folder(path):
        dataset = image_folder(path)
        classnames = load_classnames(cfg.classnames, dataset.classes)
        if len(classnames) != len(dataset.classes):
            raise ValueError(
                f"eval.classnames: {len(classnames)} class names for {len(dataset.classes)} "
                f"class directories in {path}"
            )
        loader, start = _loader(ctx, dataset.files)
        image_emb = _embed_batches(ctx, iter(loader))
        labels = torch.tensor(dataset.labels[start : start + image_emb.shape[0]], device=ctx.device)
        total = len(dataset.files)
    else:
        manifest = resolve_manifest(path)
        classnames = load_classnames(cfg.classnames, manifest.metadata.get("class_names"))
        stream = eval_batches(
            manifest, batch_size=ctx.batch_size, rank=ctx.rank, world_size=ctx.world, tokenizer=ctx.tokenizer,
            image_size=ctx.image_size, max_text_len=ctx.max_text_len, caption_key=ctx.caption_key,
        )  # fmt: skip
        batches = list(stream)
        image_emb = _embed_batches(ctx, (b["pixel_values"] for b in batches))
        labels = torch.cat([b["labels"] for b in batches]).to(ctx.device) if batches else torch.zeros(0)
        if (labels < 0).any():
            raise ValueError(f"{manifest.name}: zero-shot needs a 'cls' field in every sample")
        total = None
    templates = load_templates(cfg.templates)
    class_emb = class_embeddings(ctx, classnames, templates)
    hits = zero_shot_topk(image_emb, class_emb, labels, ks=(1, 5))
    counts = torch.tensor([hits[1], hits[5], labels.numel()], dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        counts = comm.all_reduce_sum(counts)
    n = int(counts[2])
    if total is not None and n != total:
        raise RuntimeError(f"zero-shot saw {n} of {total} images")
    return {
        "zeroshot/top1": float(counts[0]) / n,
        "zeroshot/top5": float(counts[1]) / n,
        "zeroshot/num_images": n,
    }


def retrieval(ctx: BenchmarkContext, cfg: EvalConfig) -> dict[str, float]:
    """Image↔text recall@1/5/10 with several captions per image."""
    path = cfg.retrieval_path
    if (
        path.endswith(".json")
        and not is_remote(path)
        and Path(path).is_file()
        and Path(path).name != "dataset.json"
    ):
        data = karpathy_split(path, cfg.retrieval_images or None, cfg.retrieval_split)
        loader, _ = _loader(ctx, data.files)
        image_batches: Iterator[torch.Tensor] = iter(loader)
    else:
        data = shard_retrieval_set(resolve_manifest(path), ctx.image_size, ctx.caption_key)
        n = data.num_images
        mine = data.pixels[n * ctx.rank // ctx.world : n * (ctx.rank + 1) // ctx.world]
        image_batches = (
            torch.from_numpy(np.stack(mine[i : i + ctx.batch_size])).permute(0, 3, 1, 2)
            for i in range(0, len(mine), ctx.batch_size)
        )
    image_emb = gather_rows(_embed_batches(ctx, image_batches))
    t0 = len(data.captions) * ctx.rank // ctx.world
    t1 = len(data.captions) * (ctx.rank + 1) // ctx.world
    # Same number of text forwards on every rank: pad this rank's slice to the longest one.
    longest = -(-len(data.captions) // ctx.world)
    mine_txt = data.captions[t0:t1]
    padded = mine_txt + [data.captions[0]] * (longest - len(mine_txt))
    text_emb = gather_rows(encode_texts_batched(ctx, padded)[: len(mine_txt)])
    text_image = torch.tensor(data.text_image, device=ctx.device)
    out = multi_caption_retrieval(image_emb, text_emb, text_image)
    out = {f"retrieval/{k}": v for k, v in out.items()}
    out["retrieval/num_images"] = image_emb.shape[0]
    out["retrieval/num_captions"] = len(data.captions)
    return out


def run_benchmarks(ctx: BenchmarkContext, cfg: EvalConfig) -> dict[str, float]:
    """Every benchmark configured in ``cfg`` (none configured: {}); keys ``eval/<benchmark>/<metric>``."""
    results: dict[str, float] = {}
    if cfg.zero_shot_path:
        results.update(zero_shot(ctx, cfg))
    if cfg.retrieval_path:
        results.update(retrieval(ctx, cfg))
    return {f"eval/{k}": float(v) for k, v in results.items()}
