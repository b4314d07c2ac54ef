"""Standard CLIP evaluation sets: zero-shot classification and multi-caption retrieval inputs.

- Zero-shot: an ImageFolder tree (``root/<class_dir>/*.jpg``, classes = sorted directory names, as
  torchvision's ImageFolder orders them -- so ImageNet's ``val/<wnid>/`` tree lines up with the built-in
  ImageNet-1k class names), or shards / an index whose samples carry a ``cls`` field.
- Class names: ``imagenet`` (built in, OpenAI CLIP's 1000 names), a text file (one name per line),
  a JSON list, or nothing (the directory names / the manifest's ``class_names``).
- Prompt templates: ``openai`` (the 80 ImageNet templates of OpenAI CLIP), ``simple``
  (``a photo of a {}.``), or a text/JSON file of templates containing ``{}``.
- Retrieval: a Karpathy-split JSON (``dataset_flickr30k.json`` / ``dataset_coco.json``) with an image
  root, or shards whose samples carry several captions (``json`` field ``{"captions": [...]}``, or one
  caption per line of the caption field).

Images are decoded and center-cropped in DataLoader workers and travel as uint8.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dist_tempnet.data.augment import EvalCrop
from dist_tempnet.data.manifest import IMAGE_FIELDS, Manifest
from dist_tempnet.data.reader import SkipLog, iter_raw_samples

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")


def _builtin(name: str) -> list[str]:
    text = resources.files("dist_tempnet.data").joinpath("zero_shot", name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


def imagenet_classnames() -> list[str]:
    """OpenAI CLIP's ImageNet-1k class names, in the order of the sorted WordNet ids (val/<wnid>)."""
    return _builtin("imagenet_classnames.txt")


def openai_imagenet_templates() -> list[str]:
    """The 80 prompt templates OpenAI CLIP ensembles for ImageNet zero-shot (``{}`` = class name)."""
    return _builtin("openai_imagenet_templates.txt")


def _read_list(path: str, what: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} file {file} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"{file}: expected a JSON list of strings ({what})")
        return items
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_classnames(spec: str, default: list[str] | None) -> list[str]:
    """``imagenet`` | a file | '' (then ``default``: directory names or the manifest's class_names)."""
    if spec == "imagenet":
        return imagenet_classnames()
    if spec:
        return _read_list(spec, "class names")
    if not default:
        raise ValueError("no class names: pass eval.classnames (imagenet or a file of names)")
    return default


def load_templates(spec: str) -> list[str]:
    """``openai`` (80 templates) | ``simple`` | a file of templates each containing '{}'."""
    if spec in ("", "openai"):
        return openai_imagenet_templates()
    if spec == "simple":
        return ["a photo of a {}."]
    templates = _read_list(spec, "prompt templates")
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"{spec}: every prompt template must contain '{{}}' (got {bad[:3] or 'none'})")
    return templates


# ------------------------------------------------------------------------------------------ images


@dataclass(frozen=True)
class ImageFiles(torch.utils.data.Dataset):
    """Image files -> uint8 [3, S, S] (center crop), decoded in DataLoader workers."""

    files: tuple[str, ...]
    image_size: int

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as image:
            pixels = np.asarray(EvalCrop(self.image_size)(image.convert("RGB")))
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def image_loader(
    files: list[str],
    image_size: int,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
) -> tuple[torch.utils.data.DataLoader, int]:
    """A loader over this rank's contiguous slice of ``files``; returns (loader, slice start).
    ``pin_memory``: uint8 batches in pinned host memory (for a CUDA device: see collate.pin_memory_for)."""
    start, stop = len(files) * rank // world, len(files) * (rank + 1) // world
    dataset = ImageFiles(tuple(files[start:stop]), image_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory
    )
    return loader, start


@dataclass(frozen=True)
class ClassificationSet:
    files: list[str]
    labels: list[int]
    classes: list[str]  # the directory names, or the manifest's class_names


def image_folder(root: str | Path) -> ClassificationSet:
    """``root/<class_dir>/<image>``; classes are the sorted directory names (torchvision's order)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"zero-shot set {root} is not a directory (expected root/<class>/<image>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix in IMAGE_SUFFIXES)
        files += [str(p) for p in found]
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"{root}: the class directories hold no images ({', '.join(IMAGE_SUFFIXES[:5])})")
    return ClassificationSet(files, labels, [c.replace("_", " ") for c in classes])


# --------------------------------------------------------------------------------------- retrieval


@dataclass(frozen=True)
class RetrievalSet:
    """Images (files or decoded arrays) with several captions each: ``text_image[j]`` = caption j's image."""

    captions: list[str]
    text_image: list[int]
    files: list[str] | None = None  # image files (Karpathy JSON)
    pixels: list[np.ndarray] | None = None  # uint8 [S, S, 3] (from shards)

    @property
    def num_images(self) -> int:
        return len(self.files) if self.files is not None else len(self.pixels or [])


def karpathy_split(json_path: str | Path, image_root: str | Path | None, split: str = "test") -> RetrievalSet:
    """Flickr30k / COCO in the Karpathy-split JSON (``{"images": [{"filename", "split",
    "sentences": [{"raw"}], "filepath"?}]}``); images under ``image_root`` (default: the JSON's dir)."""
    json_path = Path(json_path)
    raw = json.loads(json_path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise ValueError(f"{json_path}: expected a Karpathy-split JSON object with an 'images' list")
    root = Path(image_root) if image_root else json_path.parent
    files, captions, text_image = [], [], []
    for entry in raw["images"]:
        if entry.get("split") != split:
            continue
        sentences = [s["raw"].strip() for s in entry.get("sentences", [])]
        if not sentences:
            raise ValueError(f"{json_path}: image {entry.get('filename')!r} has no sentences")
        path = root / entry.get("filepath", "") / entry["filename"]
        if not path.is_file():
            raise FileNotFoundError(
                f"{json_path}: image {path} (split {split}) does not exist; pass the image root"
            )
        text_image += [len(files)] * len(sentences)
        files.append(str(path))
        captions += sentences
    if not files:
        raise ValueError(f"{json_path}: no images in split {split!r}")
    return RetrievalSet(captions, text_image, files=files)


def _captions_of(raw: dict[str, Any], caption_key: str) -> list[str]:
    if "json" in raw:
        meta = json.loads(raw["json"].decode("utf-8"))
        if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
            return [str(c) for c in meta["captions"]]
    if caption_key in raw:
        return [line for line in raw[caption_key].decode("utf-8").splitlines() if line.strip()]
    return []


def shard_retrieval_set(manifest: Manifest, image_size: int, caption_key: str = "txt") -> RetrievalSet:
    """Every sample of ``manifest`` with its list of captions (bad samples skipped and counted)."""
    skips = SkipLog(allow_corrupt=True)
    captions, text_image, pixels = [], [], []
    crop = EvalCrop(image_size)
    for shard in manifest.shards:
        for raw in iter_raw_samples(shard, "image_text", skips, caption_key):
            texts = _captions_of(raw, caption_key)
            field = next(f for f in IMAGE_FIELDS if f in raw)
            try:
                with Image.open(io.BytesIO(raw[field])) as image:
                    decoded = np.asarray(crop(image.convert("RGB")))
            except Exception as exc:
                skips.corrupt(f"{shard.url}: sample {raw['__key__']!r}: cannot decode ({exc})")
                continue
            text_image += [len(pixels)] * len(texts)
            pixels.append(decoded)
            captions += texts
    if not pixels:
        raise ValueError(f"{manifest.name}: no usable retrieval samples")
    return RetrievalSet(captions, text_image, pixels=pixels)
