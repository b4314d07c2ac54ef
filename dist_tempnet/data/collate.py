"""Collation: decoded samples -> batches, and the pixel normalization done on the device.

CLIP batches travel as uint8 (a quarter of float32's bytes), in pinned memory when bound for a CUDA
device, and are normalized there (:func:`normalize_pixels`); captions are padded to a fixed length so
every step sees the same shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_tempnet.data.manifest import Manifest
from dist_tempnet.data.reader import ImageTextSample, TokenSample

# OpenAI CLIP's normalization constants (what pretrained CLIP image towers expect).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_TEXT_LEN = 32


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> CLIP-normalized floats, on whatever device ``pixels`` is (the GPU in
    training: batches travel as uint8, a quarter of the bytes of float32)."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1).mul_(255.0)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1).mul_(255.0)
    return pixels.float().sub_(mean).div_(std).to(dtype)


def pin_memory_for(device: torch.device | str | None) -> bool:
    """Whether batches bound for `device` should come in pinned (page-locked) host memory: on CUDA the
    trainer's non_blocking copy from pinned memory runs asynchronously, overlapping the step; from
    pageable memory it is a synchronous staging copy. Elsewhere pinning only costs."""
    return device is not None and torch.device(device).type == "cuda"


@dataclass(frozen=True)
class ImageTextCollator:
    """ImageTextSamples -> pixel_values (uint8 [B, 3, H, W]; see normalize_pixels), tokenized
    captions, sample ids, labels."""

    tokenizer: Any
    max_text_len: int

    def __call__(self, samples: Sequence[ImageTextSample]) -> dict[str, Any]:
        pixels = torch.from_numpy(np.stack([s.pixels for s in samples]))  # uint8 [B, H, W, 3]
        # Fixed-length padding: every step sees the same shapes (no recompiles, no ragged collectives).
        text = self.tokenizer(
            [s.caption for s in samples],
            padding="max_length",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        return {
            "pixel_values": pixels.permute(0, 3, 1, 2).contiguous(),
            "input_ids": text["input_ids"].long(),
            "attention_mask": text["attention_mask"].long(),
            "sample_ids": torch.tensor([s.sample_id for s in samples], dtype=torch.long),
            "labels": torch.tensor([s.label for s in samples], dtype=torch.long),
        }


def collate_tokens(samples: Sequence[TokenSample]) -> dict[str, Any]:
    batch = {
        "input_ids": torch.from_numpy(np.stack([s.tokens for s in samples])),
        "sample_ids": torch.tensor([s.sample_id for s in samples], dtype=torch.long),
    }
    if any(s.loss_mask is not None for s in samples):
        # Chat shards: the LM task keeps only masked-in (assistant) tokens as targets.
        ones = np.ones_like(samples[0].tokens, dtype=bool)
        batch["loss_mask"] = torch.from_numpy(
            np.stack([s.loss_mask if s.loss_mask is not None else ones for s in samples])
        )
    return batch


def resolve_tokenizer(tokenizer: Any, manifest: Manifest) -> Any:
    from dist_tempnet.data.text_tokenizer import load_text_tokenizer

    if tokenizer is None:
        path = manifest.tokenizer_path
        if path is None:
            raise ValueError(f"{manifest.path}: metadata names no tokenizer; pass tokenizer=...")
        return load_text_tokenizer(path)
    if isinstance(tokenizer, (str, Path)):
        return load_text_tokenizer(tokenizer)
    return tokenizer


def resolve_image_size(image_size: int | None, manifest: Manifest) -> int:
    size = image_size if image_size is not None else manifest.image_size
    if size is None:
        raise ValueError(f"{manifest.path}: images are not of one square size; pass image_size=...")
    return int(size)
