"""Reading one shard: tar parsing (webdataset), per-sample validation, decoding to numpy, and the
corrupt-data policy (raise a CorruptShardError naming the shard, or skip, count and warn)."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dist_tempnet.data.manifest import IMAGE_FIELDS, Manifest, ShardInfo
from dist_tempnet.data.sources import is_remote, open_url


class CorruptShardError(ValueError):
    """A shard (or a sample in it) cannot be read; the message names the shard and the problem."""


@dataclass
class SkipLog:
    """The corrupt-data policy of one reader: raise, or (allow_corrupt) warn, count and go on.

    ``tolerate_samples``: a bad sample (no caption, undecodable image) is skipped and counted even
    without allow_corrupt -- the norm for web-scraped shards indexed by index-shards, where a few
    samples in every million are broken; a damaged tar still follows allow_corrupt.
    """

    allow_corrupt: bool
    count: int = 0  # corrupt events (a truncated shard is one event)
    samples: int = 0  # samples lost to them (the unread rest of a truncated shard counts in full)
    shards: int = 0  # shards that could not be read to the end
    tolerate_samples: bool = False

    def corrupt(
        self, message: str, sample_level: bool = False, samples: int = 1, shard: bool = False
    ) -> None:
        if not (self.allow_corrupt or (sample_level and self.tolerate_samples)):
            raise CorruptShardError(message)
        self.count += 1
        self.samples += max(0, samples)
        self.shards += int(shard)
        warnings.warn(f"skipping corrupt data: {message}", RuntimeWarning, stacklevel=3)


def check_shards_on_disk(manifest: Manifest, allow_corrupt: bool) -> None:
    """Fail before iteration starts on a missing local shard, or on one whose size differs from the
    manifest (remote shards are checked when they are read)."""
    for shard in manifest.shards:
        if is_remote(shard.url):
            continue
        if not shard.path.is_file():
            raise FileNotFoundError(f"shard {shard.path} listed in {manifest.name} does not exist")
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


def _sample_problem(raw: dict[str, Any], kind: str, caption_key: str) -> str | None:
    """Why a raw tar sample is unusable, or None if it is well formed (``__id__`` already set)."""
    if "id" in raw:  # shards written by make-shards store the id: it must be the one its slot gives
        try:
            stored = int(raw["id"].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return f"field 'id' is not an integer: {raw['id'][:20]!r}"
        if stored != raw["__id__"]:
            return f"field 'id' ({stored}) does not match its position in the shard (id {raw['__id__']})"
    if kind == "image_text":
        if caption_key not in raw:
            return f"missing caption field {caption_key!r}"
        if not any(f in raw for f in IMAGE_FIELDS):
            return f"missing an image field (one of {IMAGE_FIELDS})"
    elif "ids.npy" not in raw:
        return "missing field 'ids.npy'"
    return None


def iter_raw_samples(
    shard: ShardInfo, kind: str, skips: SkipLog, caption_key: str = "txt"
) -> Iterator[dict[str, Any]]:
    """Yield one shard's well-formed raw samples (field -> bytes, ``__key__``, and ``__id__``: the
    shard's first id plus the sample's position in the shard).

    The shard is opened through data.sources (local, https://, s3://, pipe:, ...). A tar-level error
    ends the shard (the rest of it is skipped as one corrupt event); a shard that parses cleanly but
    holds fewer or more samples than its manifest entry is corrupt too.
    """
    try:
        handle = open_url(shard.url)  # opened here (not by webdataset) so it is always closed
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"shard {shard.url} vanished before reading ({_describe(exc)})") from exc
    seen = 0
    # A truncated shard is one lost shard even when its cut also broke a sample (reported on its own).
    shards_before = skips.shards
    # Imported here: the training worker and benchmarks import this module on GPU boxes without
    # webdataset (only reading shards needs it).
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        stream = group_by_keys(tar_file_expander([{"url": shard.url, "stream": handle}]))
        while True:
            try:
                raw = next(stream)
            except StopIteration:
                break
            except Exception as exc:  # tarfile.ReadError, EOFError, ValueError (duplicate names), ...
                skips.corrupt(
                    f"{shard.url}: unreadable tar data after {seen} samples ({_describe(exc)})",
                    samples=shard.num_samples - seen,
                    shard=True,
                )
                return
            position = seen
            seen += 1
            if position >= shard.num_samples:  # no slot: its id would belong to the next shard
                continue
            raw["__id__"] = shard.id_start + position
            problem = _sample_problem(raw, kind, caption_key)
            if problem is not None:
                skips.corrupt(f"{shard.url}: sample {raw.get('__key__')!r}: {problem}", sample_level=True)
                continue
            yield raw
    finally:
        _close(handle, shard.url, skips)
    if skips.shards == shards_before and seen != shard.num_samples:
        skips.corrupt(
            f"{shard.url}: holds {seen} samples, but the manifest says {shard.num_samples} "
            "(truncated or replaced shard?)",
            samples=shard.num_samples - seen,
            shard=True,
        )


def _close(handle: Any, url: str, skips: SkipLog) -> None:
    # gopen's pipes (curl, pipe:) report a failed command only when closed.
    try:
        handle.close()
    except Exception as exc:
        skips.corrupt(f"{url}: reading failed ({_describe(exc)})")


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
    """Decode one raw sample: the image (any of IMAGE_FIELDS) through ``transform`` (center-crop by
    default; a random resized crop for training, see data.augment) and the caption."""

    image_size: int
    caption_key: str = "txt"
    transform: Callable[[Image.Image, int, int], Image.Image] | None = None  # (image, id, epoch)

    def __call__(self, raw: dict[str, Any], shard: ShardInfo, skips: SkipLog) -> ImageTextSample | None:
        field = next(f for f in IMAGE_FIELDS if f in raw)
        try:
            with Image.open(io.BytesIO(raw[field])) as image:
                image = image.convert("RGB")
                if self.transform is not None:
                    fitted = self.transform(image, raw["__id__"], raw.get("__epoch__", 0))
                else:
                    fitted = fit_image(image, self.image_size)
                pixels = np.asarray(fitted)
            caption = raw[self.caption_key].decode("utf-8")
            label = int(raw["cls"].decode("ascii")) if "cls" in raw else -1
        except Exception as exc:  # PIL.UnidentifiedImageError, OSError (truncated image), decode errors
            skips.corrupt(
                f"{shard.url}: sample {raw['__key__']!r}: cannot decode ({_describe(exc)})", sample_level=True
            )
            return None
        return ImageTextSample(pixels, caption, raw["__id__"], label)


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
        return TokenSample(tokens.astype(np.int64), raw["__id__"], mask)
