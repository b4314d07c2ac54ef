"""Evaluation passes: finite, deterministic and unshuffled; ranks take balanced contiguous ranges
of sample ids, so every sample is seen exactly once overall."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from dist_tempnet.data.collate import (
    DEFAULT_MAX_TEXT_LEN,
    ImageTextCollator,
    collate_tokens,
    resolve_image_size,
    resolve_tokenizer,
)
from dist_tempnet.data.loaders import ManifestLike
from dist_tempnet.data.manifest import INDEX_VERSION, Manifest, resolve_manifest
from dist_tempnet.data.reader import (
    ImageTextDecoder,
    SkipLog,
    TokenDecoder,
    check_shards_on_disk,
    iter_raw_samples,
)


def rank_id_range(manifest: Manifest, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous slice of the split's ids (sizes differ by at most one across ranks)."""
    n = manifest.num_samples
    return manifest.id_start + n * rank // world_size, manifest.id_start + n * (rank + 1) // world_size


class EvalBatches:
    """A finite, deterministic pass over this rank's slice of a split; iterable any number of times.

    ``len()`` is the number of batches (the last may be partial; fewer if corrupt samples are skipped
    under allow_corrupt); ``num_samples`` is this rank's sample count. Ranks may get one batch more or
    less than each other: gather results after the loop, not inside it.
    """

    def __init__(
        self,
        manifest: Manifest,
        rank: int,
        world_size: int,
        batch_size: int,
        decode: Callable[..., Any],
        collate: Callable[[list[Any]], dict[str, Any]],
        allow_corrupt: bool,
        caption_key: str = "txt",
    ) -> None:
        self.manifest = manifest
        self.batch_size = batch_size
        self.id_start, self.id_stop = rank_id_range(manifest, rank, world_size)
        self.decode = decode
        self.collate = collate
        self.allow_corrupt = allow_corrupt
        self.caption_key = caption_key
        self.corrupt_skipped = 0

    @property
    def num_samples(self) -> int:
        return self.id_stop - self.id_start

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def _samples(self, skips: SkipLog) -> Iterator[Any]:
        for shard in self.manifest.shards:
            if shard.id_stop <= self.id_start or shard.id_start >= self.id_stop:
                continue
            for raw in iter_raw_samples(shard, self.manifest.kind, skips, self.caption_key):
                if self.id_start <= raw["__id__"] < self.id_stop:
                    decoded = self.decode(raw, shard, skips)
                    if decoded is not None:
                        yield decoded

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skips = SkipLog(self.allow_corrupt, tolerate_samples=self.manifest.version == INDEX_VERSION)
        batch: list[Any] = []
        for sample in self._samples(skips):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
            self.corrupt_skipped = skips.count
        if batch:
            yield self.collate(batch)
        self.corrupt_skipped = skips.count


def eval_batches(
    manifest_or_dir: ManifestLike,
    split: str | None = None,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Any = None,
    image_size: int | None = None,
    max_text_len: int = DEFAULT_MAX_TEXT_LEN,
    allow_corrupt: bool = False,
    caption_key: str = "txt",
) -> EvalBatches:
    """One ordered pass over a split (image-text or tokens; same batch keys as the training streams).

    ``split`` defaults to "eval" when ``manifest_or_dir`` is a dataset root.

    With ``world_size > 1`` each rank reads a disjoint contiguous id range; together they cover every
    sample exactly once.
    """
    manifest = resolve_manifest(manifest_or_dir, split, default_split="eval")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            "need batch_size >= 1 and 0 <= rank < world_size, got "
            f"batch_size={batch_size} rank={rank} world_size={world_size}"
        )
    check_shards_on_disk(manifest, allow_corrupt)
    if manifest.kind == "image_text":
        decode: Callable[..., Any] = ImageTextDecoder(resolve_image_size(image_size, manifest), caption_key)
        collate: Callable[[list[Any]], dict[str, Any]] = ImageTextCollator(
            resolve_tokenizer(tokenizer, manifest), max_text_len
        )
    else:
        decode, collate = TokenDecoder(manifest.seq_len), collate_tokens
    return EvalBatches(manifest, rank, world_size, batch_size, decode, collate, allow_corrupt, caption_key)
