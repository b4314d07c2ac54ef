"""Reading one shard: tar parsing (webdataset), per-sample validation, decoding to numpy, and the
corrupt-data policy (raise a CorruptShardError naming the shard, or skip, count and warn)."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from dist_tempnet.data.manifest import IMAGE_FIELDS, Manifest, ShardInfo


class CorruptShardError(ValueError):
    """A shard (or a sample in it) cannot be read; the message names the shard and the problem."""


@dataclass
class SkipLog:
    """The corrupt-data policy of one reader: raise, or (allow_corrupt) warn, count and go on."""

    allow_corrupt: bool
    count: int = 0

    def corrupt(self, message: str) -> None:
        if not self.allow_corrupt:
            raise CorruptShardError(message)
        self.count += 1
        warnings.warn(f"skipping corrupt data: {message}", RuntimeWarning, stacklevel=3)


def check_shards_on_disk(manifest: Manifest, allow_corrupt: bool) -> None:
    """Fail before iteration starts on a missing shard, or on one whose size differs from the manifest."""
    for shard in manifest.shards:
        if not shard.path.is_file():
            raise FileNotFoundError(f"shard {shard.path} listed in {manifest.path} does not exist")
        size = os.path.getsize(shard.path)
        if shard.num_bytes is not None and size != shard.num_bytes:
            message = (
                f"{shard.url}: {size} bytes on disk, but {manifest.path} says {shard.num_bytes} "
                "(truncated or overwritten shard?)"
            )
            if not allow_corrupt:
                raise CorruptShardError(message)
            warnings.warn(
                f"reading a suspicious shard anyway (allow_corrupt): {message}", RuntimeWarning, stacklevel=2
            )


def _describe(exc: BaseException) -> str:
    # webdataset appends (stream, url) to exc.args; the first arg is the readable part.
    detail = exc.args[0] if exc.args else ""
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _sample_problem(raw: dict[str, Any], shard: ShardInfo, kind: str) -> str | None:
    """Why a raw tar sample is unusable, or None if it is well formed."""
    key = raw.get("__key__", "")
    if not key.isdigit():
        return "key is not a zero-padded sample id"
    if "id" not in raw:
        return "missing field 'id'"
    try:
        sample_id = int(raw["id"].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return f"field 'id' is not an integer: {raw['id'][:20]!r}"
    if sample_id != int(key):
        return f"field 'id' ({sample_id}) does not match the key"
    if not shard.id_start <= sample_id < shard.id_stop:
        return f"id {sample_id} outside the shard's id_range [{shard.id_start}, {shard.id_stop})"
    if kind == "image_text":
        if "txt" not in raw:
            return "missing field 'txt'"
        if not any(f in raw for f in IMAGE_FIELDS):
            return f"missing an image field (one of {IMAGE_FIELDS})"
    elif "ids.npy" not in raw:
        return "missing field 'ids.npy'"
    return None


def iter_raw_samples(shard: ShardInfo, kind: str, skips: SkipLog) -> Iterator[dict[str, Any]]:
    """Yield one shard's well-formed raw samples (field -> bytes, plus ``__key__``).

    A tar-level error ends the shard (the rest of it is skipped as one corrupt event); a shard that
    parses cleanly but holds fewer or more samples than its manifest entry is corrupt too.
    """
    try:
        handle = open(shard.path, "rb")  # opened here (not by webdataset) so it is always closed
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"shard {shard.url} vanished before reading ({_describe(exc)})") from exc
    seen = 0
    problems_before = skips.count
    with handle:
        stream = group_by_keys(tar_file_expander([{"url": shard.url, "stream": handle}]))
        while True:
            try:
                raw = next(stream)
            except StopIteration:
                break
            except Exception as exc:  # tarfile.ReadError, EOFError, ValueError (duplicate names), ...
                skips.corrupt(f"{shard.url}: unreadable tar data after {seen} samples ({_describe(exc)})")
                return
            seen += 1
            problem = _sample_problem(raw, shard, kind)
            if problem is not None:
                skips.corrupt(f"{shard.url}: sample {raw.get('__key__')!r}: {problem}")
                continue
            yield raw
    if skips.count == problems_before and seen != shard.num_samples:
        skips.corrupt(
            f"{shard.url}: holds {seen} samples, but the manifest says {shard.num_samples} "
            "(truncated or replaced shard?)"
        )


# ------------------------------------------------------------------------------------------ decoding


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and center-crop to a square (no-op at the right size)."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class ImageTextSample:
    pixels: np.ndarray  # uint8 [H, W, 3]
    caption: str
    sample_id: int
    label: int  # -1 when the dataset has no class labels


@dataclass(frozen=True)
class ImageTextDecoder:
    image_size: int

    def __call__(self, raw: dict[str, Any], shard: ShardInfo, skips: SkipLog) -> ImageTextSample | None:
        field = next(f for f in IMAGE_FIELDS if f in raw)
        try:
            with Image.open(io.BytesIO(raw[field])) as image:
                pixels = np.asarray(fit_image(image.convert("RGB"), self.image_size))
            caption = raw["txt"].decode("utf-8")
            label = int(raw["cls"].decode("ascii")) if "cls" in raw else -1
        except Exception as exc:  # PIL.UnidentifiedImageError, OSError (truncated image), decode errors
            skips.corrupt(f"{shard.url}: sample {raw['__key__']!r}: cannot decode ({_describe(exc)})")
            return None
        return ImageTextSample(pixels, caption, int(raw["__key__"]), label)


@dataclass(frozen=True)
class TokenSample:
    tokens: np.ndarray  # int64 [seq_len + 1]
    sample_id: int
    loss_mask: np.ndarray | None = None  # bool [seq_len + 1] (chat data: True on assistant tokens)


@dataclass(frozen=True)
class TokenDecoder:
    seq_len: int

    def __call__(self, raw: dict[str, Any], shard: ShardInfo, skips: SkipLog) -> TokenSample | None:
        try:
            tokens = np.load(io.BytesIO(raw["ids.npy"]), allow_pickle=False)
        except Exception as exc:
            skips.corrupt(f"{shard.url}: sample {raw['__key__']!r}: 'ids.npy' unreadable ({_describe(exc)})")
            return None
        expected = (self.seq_len + 1,)
        if tokens.shape != expected or tokens.dtype.kind not in "iu":
            skips.corrupt(
                f"{shard.url}: sample {raw['__key__']!r}: 'ids.npy' is {tokens.dtype} "
                f"{tokens.shape}, expected integer {expected}"
            )
            return None
        mask = None
        if "mask.npy" in raw:
            try:
                mask = np.load(io.BytesIO(raw["mask.npy"]), allow_pickle=False)
            except Exception as exc:
                where = f"{shard.url}: sample {raw['__key__']!r}"
                skips.corrupt(f"{where}: 'mask.npy' unreadable ({_describe(exc)})")
                return None
            if mask.shape != expected:
                skips.corrupt(
                    f"{shard.url}: sample {raw['__key__']!r}: 'mask.npy' is {mask.shape}, expected {expected}"
                )
                return None
            mask = mask.astype(bool)
        return TokenSample(tokens.astype(np.int64), int(raw["__key__"]), mask)
