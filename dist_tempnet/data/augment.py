"""Image transforms as OpenCLIP uses them: a random resized crop for training, a center crop for eval.

They run in the DataLoader workers on PIL images and return PIL images of ``size x size``; the
collator turns them into uint8 tensors and normalization happens on the device.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image

from dist_tempnet.data.reader import fit_image

RATIO = (3 / 4, 4 / 3)  # torchvision's / OpenCLIP's aspect-ratio range


def random_resized_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (without torchvision): (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback: the largest central crop within the ratio range.
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class TrainCrop:
    """Random resized crop with OpenCLIP's pretraining scale (default (0.9, 1.0)), bicubic."""

    size: int
    scale: tuple[float, float] = (0.9, 1.0)
    seed: int = 0

    def __call__(self, image: Image.Image, sample_id: int = 0, epoch: int = 0) -> Image.Image:
        # Seeded by (seed, epoch, sample): a new crop every epoch, yet the same one whichever worker or
        # rank decodes the sample, so a resumed run sees exactly the images an uninterrupted one would.
        rng = random.Random(f"dist_tempnet/crop/{self.seed}/{epoch}/{sample_id}")
        left, top, w, h = random_resized_box(image.width, image.height, self.scale, rng)
        return image.resize(
            (self.size, self.size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)
        )


@dataclass(frozen=True)
class EvalCrop:
    """Resize the shorter side, center-crop (OpenCLIP's eval transform)."""

    size: int

    def __call__(self, image: Image.Image) -> Image.Image:
        return fit_image(image, self.size)
