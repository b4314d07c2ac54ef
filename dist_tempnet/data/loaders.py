"""The readers: a dataset's training split -> an endless stream of batches for one rank.

:func:`clip_batches` (image-text) and :func:`token_batches` (language modelling) check their
arguments and the shards, pick the decoder and collator, and build a
:class:`~dist_tempnet.data.streams.BatchStream`; they differ only in decoding and collation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_tempnet.data.augment import TrainCrop
from dist_tempnet.data.collate import (
    DEFAULT_MAX_TEXT_LEN,
    ImageTextCollator,
    collate_tokens,
    resolve_image_size,
    resolve_tokenizer,
)
from dist_tempnet.data.manifest import Manifest, resolve_manifest
from dist_tempnet.data.reader import ImageTextDecoder, TokenDecoder, check_shards_on_disk
from dist_tempnet.data.streams import BatchStream, EpochStream, StreamResume, StreamSpec

DEFAULT_SHUFFLE_BUFFER = 1024

ManifestLike = str | Path | Manifest


def _resume_fields(resume: StreamResume | None, epoch_start: int) -> dict[str, Any]:
    if resume is None:
        return {"epoch_start": epoch_start}
    return {
        "epoch_start": resume.epoch_start,
        "consumed": resume.consumed,
        "worker_offset": resume.worker_offset,
    }


def _check_stream_args(
    manifest: Manifest, batch_size: int, rank: int, world_size: int, num_workers: int
) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    readers = world_size * max(1, num_workers)
    if len(manifest.shards) < readers:
        raise ValueError(
            f"{manifest.path}: {len(manifest.shards)} shards cannot feed {world_size} ranks x "
            f"{max(1, num_workers)} workers ({readers} readers, each needs >= 1 shard); rewrite the data "
            "with a smaller samples_per_shard or use fewer workers"
        )


def _manifest_of_kind(manifest_or_dir: ManifestLike, split: str | None, kind: str) -> Manifest:
    manifest = resolve_manifest(manifest_or_dir, split, default_split="train")
    if manifest.kind != kind:
        raise ValueError(f"{manifest.path}: holds {manifest.kind!r} samples, this reader needs {kind!r}")
    return manifest


def _training_stream(
    manifest: Manifest, decode: Callable[..., Any], collate: Callable[[list[Any]], dict[str, Any]],
    batch_size: int, rank: int, world_size: int, num_workers: int, shuffle_buffer: int, seed: int,
    allow_corrupt: bool, epoch_start: int, shuffle: bool, resume: StreamResume | None,
    caption_key: str = "txt", pin_memory: bool = False,
) -> BatchStream:  # fmt: skip
    """The endless stream both training readers share; they differ only in decode/collate."""
    _check_stream_args(manifest, batch_size, rank, world_size, num_workers)
    check_shards_on_disk(manifest, allow_corrupt)
    spec = StreamSpec(
        manifest=manifest, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
        shuffle=shuffle, shuffle_buffer=shuffle_buffer, allow_corrupt=allow_corrupt, decode=decode,
        collate=collate, caption_key=caption_key, **_resume_fields(resume, epoch_start),
    )  # fmt: skip
    return BatchStream(EpochStream(spec), num_workers, resume, pin_memory)


def clip_batches(
    manifest_or_dir: ManifestLike,
    split: str | None = None,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Any = None,
    image_size: int | None = None,
    num_workers: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int = 0,
    max_text_len: int = DEFAULT_MAX_TEXT_LEN,
    allow_corrupt: bool = False,
    epoch_start: int = 0,
    shuffle: bool = True,
    resume: StreamResume | None = None,
    caption_key: str = "txt",
    crop_scale: tuple[float, float] | None = None,
    pin_memory: bool = False,
) -> BatchStream:
    """Endless image-text training batches for one rank.

    ``manifest_or_dir``: a Manifest, a dataset.json, a split directory, or a dataset root (then
    ``split``, default "train", picks the sub-directory; an explicit ``split`` must match).

    Each batch: ``pixel_values`` uint8 [B, 3, H, W] (normalize on the device with
    :func:`normalize_pixels`: a quarter of float32's bytes to copy), ``input_ids`` int64 [B, L],
    ``attention_mask`` int64 [B, L] (L = max_text_len), ``sample_ids`` int64 [B], ``labels`` int64 [B]
    (class index, -1 when the data has none). ``tokenizer``: a tokenizer object, a path, or None for
    the manifest's own tokenizer. ``image_size``: None keeps the stored size (images are resized and
    center-cropped otherwise). ``resume`` (from :func:`resume_position`) continues an earlier run's
    exact data position and overrides ``epoch_start``. ``pin_memory``: deliver batches in pinned
    host memory (see :func:`pin_memory_for`).
    """
    manifest = _manifest_of_kind(manifest_or_dir, split, "image_text")
    size = resolve_image_size(image_size, manifest)
    transform = TrainCrop(size, tuple(crop_scale), seed) if crop_scale is not None else None
    decode = ImageTextDecoder(size, caption_key, transform)
    collate = ImageTextCollator(resolve_tokenizer(tokenizer, manifest), max_text_len)
    return _training_stream(manifest, decode, collate, batch_size, rank, world_size, num_workers,
                            shuffle_buffer, seed, allow_corrupt, epoch_start, shuffle, resume,
                            caption_key, pin_memory)  # fmt: skip


def token_batches(
    manifest_or_dir: ManifestLike,
    split: str | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int = 0,
    allow_corrupt: bool = False,
    epoch_start: int = 0,
    shuffle: bool = True,
    resume: StreamResume | None = None,
    pin_memory: bool = False,
) -> BatchStream:
    """Endless language-model batches: ``input_ids`` int64 [B, seq_len + 1], ``sample_ids`` int64 [B],
    and for chat shards ``loss_mask`` bool [B, seq_len + 1] (True where the token is a loss target).

    Inputs are ``input_ids[:, :-1]`` and next-token labels ``input_ids[:, 1:]``. ``resume``,
    ``pin_memory``: as in :func:`clip_batches`.
    """
    manifest = _manifest_of_kind(manifest_or_dir, split, "tokens")
    return _training_stream(manifest, TokenDecoder(manifest.seq_len), collate_tokens, batch_size, rank,
                            world_size, num_workers, shuffle_buffer, seed, allow_corrupt, epoch_start,
                            shuffle, resume, pin_memory=pin_memory)  # fmt: skip
