"""Sample ids for shards this project did not write: the shard index (``index-shards``).

The DRO state needs a stable contiguous integer id per sample. The index records, per shard, its
URL, its number of sample slots and its first id; a sample's id is that offset plus its position in
the shard (a corrupt sample keeps its slot, unused). That is O(shards), not O(samples). The index is
a version-2 ``dataset.json`` (see manifest.py), so demo shards and indexed shards have one reader.

Counts come from img2dataset's ``<shard>_stats.json`` (``successes``: samples written to the tar)
when present; other shards are read once, in parallel, counting tar samples. Re-indexing with more
shards keeps the old entries and their ids as they are and appends the new shards after them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_tempnet.data.manifest import (
    FORMAT_NAME,
    IMAGE_FIELDS,
    INDEX_VERSION,
    MANIFEST_NAME,
    Manifest,
    manifest_from_dict,
    read_manifest,
    write_manifest,
)
from dist_tempnet.data.sources import (
    exists,
    expand_source,
    is_remote,
    open_url,
    read_bytes,
    scheme,
    stats_url,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardCount:
    url: str
    num_samples: int  # slots (samples in the tar)
    failed: int  # img2dataset's failed downloads/resizes, or samples without image/caption (read)
    counted_from: str  # "stats" | "read"
    fields: tuple[str, ...] = ()


def _read_stats(url: str) -> dict[str, Any] | None:
    side = stats_url(url)
    if side is None or (not is_remote(side) and not exists(side)) or scheme(side) == "pipe":
        return None
    try:
        data = read_bytes(side)
    except (OSError, ValueError):  # absent (curl's 404, fsspec's FileNotFoundError)
        return None
    try:
        stats = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        logger.warning("%s: unreadable (%s); reading the shard instead", side, exc)
        return None
    if not isinstance(stats.get("successes"), int) or stats["successes"] < 0:
        logger.warning("%s: no integer 'successes' count; reading the shard instead", side)
        return None
    return stats


def _count_from_stats(url: str) -> ShardCount | None:
    stats = _read_stats(url)
    if stats is None:
        return None
    # img2dataset: count = attempted, successes = written to the tar; the rest failed before writing.
    failed = max(0, int(stats.get("count", stats["successes"])) - stats["successes"])
    return ShardCount(url, stats["successes"], failed, "stats")


def count_shard(url: str, caption_key: str = "txt", use_stats: bool = True) -> ShardCount:
    """One shard's sample count: from its _stats.json when allowed and present, else by reading it."""
    if use_stats:
        counted = _count_from_stats(url)
        if counted is not None:
            return counted
    slots = unusable = 0
    fields: set[str] = set()
    with open_url(url) as handle:
        try:
            from webdataset.tariterators import group_by_keys, tar_file_expander  # lazy: GPU boxes

            for raw in group_by_keys(tar_file_expander([{"url": url, "stream": handle}])):
                slots += 1
                keys = {k for k in raw if not k.startswith("__")}
                fields |= keys
                if caption_key not in keys or not keys & set(IMAGE_FIELDS):
                    unusable += 1
        except Exception as exc:  # a truncated or corrupt tar: the samples before the damage count
            logger.warning("%s: unreadable tar data after %d samples (%s)", url, slots, exc)
    return ShardCount(url, slots, unusable, "read", tuple(sorted(fields)))


def _count_all(urls: Sequence[str], caption_key: str, workers: int, use_stats: bool) -> list[ShardCount]:
    if workers <= 1 or len(urls) <= 1:
        return [count_shard(u, caption_key, use_stats) for u in urls]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(
            pool.map(count_shard, urls, [caption_key] * len(urls), [use_stats] * len(urls), chunksize=4)
        )


def _relative(url: str, out_dir: Path) -> str:
    """Shards under the index directory are stored relative to it (the pair can be moved together)."""
    if is_remote(url):
        return url
    try:
        return str(Path(url).resolve().relative_to(out_dir.resolve()))
    except ValueError:
        return str(Path(url).resolve())


def _entries(counts: Sequence[ShardCount], first_id: int, out_dir: Path | None) -> list[dict[str, Any]]:
    entries, next_id = [], first_id
    for c in counts:
        entry = {
            "path": _relative(c.url, out_dir) if out_dir is not None else c.url,
            "num_samples": c.num_samples,
            "id_range": [next_id, next_id + c.num_samples],
            "failed": c.failed,
            "counted_from": c.counted_from,
        }
        entries.append(entry)
        next_id += c.num_samples
    return entries


def _index_dict(entries: list[dict[str, Any]], fields: Sequence[str], split: str, meta: dict) -> dict:
    total = sum(e["num_samples"] for e in entries)
    if total == 0:
        raise ValueError("the shards hold no samples at all (every _stats.json says successes = 0?)")
    return {
        "format": FORMAT_NAME,
        "version": INDEX_VERSION,
        "kind": "image_text",
        "split": split,
        "num_samples": total,
        "id_range": [0, total],
        "fields": sorted(fields),
        "shards": entries,
        "metadata": meta,
    }


def index_shards(
    source: str | Path | Sequence[str],
    out_dir: str | Path,
    *,
    split: str = "train",
    caption_key: str = "txt",
    workers: int | None = None,
    use_stats: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Manifest:
    """Index ``source`` into ``out_dir/dataset.json`` (atomically) and return it.

    If ``out_dir`` already holds an index, its shards keep their ids and only shards it does not
    list yet are counted and appended (in source order) -- ids of existing samples never change.
    """
    out = Path(out_dir)
    urls = expand_source(source)
    old: Manifest | None = read_manifest(out) if (out / MANIFEST_NAME).is_file() else None
    old_entries: list[dict[str, Any]] = []
    if old is not None:
        if old.version != INDEX_VERSION:
            raise ValueError(f"{old.path}: written by make-shards (version {old.version}), not an index")
        raw_old = json.loads(old.path.read_text(encoding="utf-8"))
        old_entries = raw_old["shards"]
        known = {s.url for s in old.shards}
        missing = [s.url for s in old.shards if s.url not in set(urls)]
        if missing:
            logger.warning(
                "%d indexed shards are not in the source any more (ids kept): %s", len(missing), missing[:3]
            )
        urls = [u for u in urls if u not in known]
    workers = workers or min(len(urls), os.cpu_count() or 1) or 1
    counts = _count_all(urls, caption_key, workers, use_stats)
    first_id = old.id_stop if old is not None else 0
    entries = old_entries + _entries(counts, first_id, out)
    fields = set(old.fields if old else ())
    for c in counts:
        fields |= set(c.fields)
    meta = dict(old.metadata if old else {})
    meta.update(metadata or {})
    meta.setdefault("caption_key", caption_key)
    meta["failed"] = sum(e.get("failed", 0) for e in entries)
    out.mkdir(parents=True, exist_ok=True)
    path = write_manifest(out, _index_dict(entries, sorted(fields), split, meta))
    logger.info(
        "indexed %d new shards (%d from _stats.json), %d samples in total -> %s",
        len(counts), sum(c.counted_from == "stats" for c in counts), entries[-1]["id_range"][1], path,
    )  # fmt: skip
    return read_manifest(path)


def index_without_reading(source: Any, split: str = "train") -> Manifest:
    """An in-memory index for shards that all carry img2dataset ``_stats.json`` files (no tar read).

    Anything else must be indexed first: training never reads the whole dataset at start-up.
    """
    urls = expand_source(source)
    counts = [_count_from_stats(u) for u in urls]
    missing = [u for u, c in zip(urls, counts) if c is None]
    if missing:
        raise FileNotFoundError(
            f"{source}: {len(missing)} of {len(urls)} shards have no img2dataset _stats.json (e.g. "
            f"{missing[0]}), so sample ids cannot be assigned without reading them; run "
            "`dist-tempnet index-shards SOURCE --out INDEX_DIR` once and set data.path to INDEX_DIR"
        )
    raw = _index_dict(_entries(counts, 0, None), (), split, {"source": str(source)})
    return manifest_from_dict(raw, f"<index of {source}>")


__all__ = ["ShardCount", "count_shard", "index_shards", "index_without_reading"]
