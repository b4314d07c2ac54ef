"""Your own image–caption pairs to standard webdataset shards (``make-shards --pairs FILE``).

FILE is a table (.csv, .tsv, .parquet, .jsonl) with an image-path column and a caption column
(paths relative to FILE). Output is what img2dataset writes, so the same tools read both:
``000000000.tar`` holding ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` per sample and
``000000000_stats.json`` beside it (``count``, ``successes``, ``failed_to_download`` = missing files,
``failed_to_resize`` = undecodable images). Corrupt or missing images are skipped and counted, never
fatal. Finally the directory is indexed (``dataset.json``), so ``data.path`` can point at it directly.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from dist_tempnet.data.atomic import publish, tmp_path_for, write_json_atomic

logger = logging.getLogger(__name__)

RESIZE_MODES = ("center_crop", "keep_ratio", "border", "no")
READERS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl"}


def read_pairs_table(path: Path, image_col: str, caption_col: str) -> pd.DataFrame:
    """The table's image and caption columns (error names the file and the columns it has)."""
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported pairs file type {path.suffix!r} (expected {sorted(READERS)})")
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    if kind == "csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif kind == "tsv":
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    elif kind == "parquet":
        table = pd.read_parquet(path)
    else:
        table = pd.read_json(path, lines=True, dtype=False)
    missing = [c for c in (image_col, caption_col) if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: no column(s) {missing}; it has {list(table.columns)} "
            "(choose them with --image-column / --caption-column)"
        )
    return table[[image_col, caption_col]].rename(columns={image_col: "image", caption_col: "caption"})


def resize(image: Image.Image, size: int | None, mode: str) -> Image.Image:
    """img2dataset's resize modes: center_crop (shorter side to size, crop), keep_ratio (shorter side
    to size), border (longer side to size, padded black to a square), no (unchanged)."""
    if size is None or mode == "no":
        return image
    width, height = image.size
    if mode == "border":
        scale = size / max(width, height)
        inner = image.resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC
        )
        canvas = Image.new("RGB", (size, size))
        canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return canvas
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if mode == "keep_ratio":
        return image
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class ShardJob:
    index: int
    rows: list[tuple[str, str]]  # (image path as written in the table, caption)
    base: str  # the pairs file's directory
    out_dir: str
    image_size: int | None
    resize_mode: str
    quality: int
    key_digits: int


def _encode(path: Path, job: ShardJob) -> tuple[bytes, dict[str, int]]:
    with Image.open(path) as image:
        image.load()
        original = image.size
        fitted = resize(image.convert("RGB"), job.image_size, job.resize_mode)
    buffer = io.BytesIO()
    fitted.save(buffer, format="JPEG", quality=job.quality)
    sizes = {"width": fitted.width, "height": fitted.height}
    return buffer.getvalue(), {**sizes, "original_width": original[0], "original_height": original[1]}


def write_shard(job: ShardJob) -> dict[str, Any]:
    """One tar + its _stats.json; returns the stats."""
    start = time.time()
    name = f"{job.index:09d}"
    final = Path(job.out_dir) / f"{name}.tar"
    tmp = tmp_path_for(final)
    stats = {"count": len(job.rows), "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    errors: list[str] = []
    import webdataset as wds  # lazy: importing this module must not need webdataset

    with wds.TarWriter(str(tmp), encoder=False, mtime=0, user="", group="") as tar:
        for i, (image_path, caption) in enumerate(job.rows):
            path = Path(job.base) / image_path
            if not path.is_file():
                stats["failed_to_download"] += 1
                errors.append(f"{path}: missing")
                continue
            try:
                data, sizes = _encode(path, job)
            except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, ...
                stats["failed_to_resize"] += 1
                errors.append(f"{path}: {type(exc).__name__}: {exc}")
                continue
            key = f"{job.index:05d}{i:0{job.key_digits}d}"
            meta = {"key": key, "caption": caption, "url": image_path, "status": "success", **sizes}
            tar.write(
                {
                    "__key__": key,
                    "jpg": data,
                    "txt": caption.encode("utf-8"),
                    "json": json.dumps(meta).encode("utf-8"),
                }
            )
            stats["successes"] += 1
    publish(tmp, final)
    stats.update({"start_time": start, "end_time": time.time(), "status": "success"})
    write_json_atomic(Path(job.out_dir) / f"{name}_stats.json", stats)
    for message in errors[:3]:
        logger.warning("skipped %s", message)
    return stats


def make_pair_shards(
    pairs_file: str | Path,
    out_dir: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    image_size: int | None = None,
    resize_mode: str = "center_crop",
    samples_per_shard: int = 10000,
    quality: int = 95,
    workers: int = 1,
) -> dict[str, int]:
    """Write ``pairs_file``'s image–caption pairs as img2dataset-style shards in ``out_dir`` and index
    them; returns the summed counts (count, successes, failed_to_download, failed_to_resize)."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {resize_mode!r}: expected one of {RESIZE_MODES}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    pairs_file = Path(pairs_file).resolve()
    table = read_pairs_table(pairs_file, image_column, caption_column)
    if table.empty:
        raise ValueError(f"{pairs_file}: no rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds shards; write to an empty directory")
    rows = list(zip(table["image"].astype(str), table["caption"].astype(str)))
    digits = max(4, len(str(samples_per_shard - 1)))
    jobs = [
        ShardJob(
            i,
            rows[i * samples_per_shard : (i + 1) * samples_per_shard],
            str(pairs_file.parent),
            str(out),
            image_size,
            resize_mode,
            quality,
            digits,
        )  # fmt: skip
        for i in range(math.ceil(len(rows) / samples_per_shard))
    ]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            all_stats = list(pool.map(write_shard, jobs))
    else:
        all_stats = [write_shard(job) for job in jobs]
    totals = {
        k: sum(s[k] for s in all_stats)
        for k in ("count", "successes", "failed_to_download", "failed_to_resize")
    }
    if totals["successes"] == 0:
        raise ValueError(f"{pairs_file}: not one image could be read (see the warnings above)")
    from dist_tempnet.data.index import index_shards

    square = image_size if resize_mode in ("center_crop", "border") else None
    index_shards(out, out, workers=1, metadata={"image_size": square, "pairs": str(pairs_file)})
    logger.info("wrote %d shards to %s: %s", len(jobs), out, totals)
    return totals
