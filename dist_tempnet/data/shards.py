"""Writing webdataset tar shards in which every sample carries a stable integer sample id.

Layout of a dataset root::

    root/<split>/<split>-000000.tar ...   webdataset shards
    root/<split>/dataset.json             manifest (see manifest.py), written last

Each sample is stored under ``__key__ = f"{id:012d}"`` and carries an ``id`` field (ASCII decimal), so
the id survives any re-sharding or shuffling. Ids are assigned sequentially by the writer, starting at
``first_id`` (0 by default: a training split's ids are then exactly ``range(num_samples)``, which is
what the per-sample DRO state is indexed by).
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dist_tempnet.data.atomic import TMP_SUFFIX, publish, tmp_path_for
from dist_tempnet.data.manifest import MANIFEST_NAME, build_manifest_dict, write_manifest

KEY_DIGITS = 12
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def sample_key(sample_id: int) -> str:
    """The webdataset ``__key__`` of a sample: its zero-padded id (no dots, sorts numerically)."""
    return f"{sample_id:0{KEY_DIGITS}d}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def progress(iterable: Iterable[Any], total: int | None, desc: str) -> Iterable[Any]:
    # Bars only on an interactive terminal: logs of Ray workers and CI stay clean.
    return tqdm(iterable, total=total, desc=desc, unit="sample", disable=not sys.stderr.isatty())


def prepare_split_dir(split_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber a complete split unless asked; clear leftovers of an interrupted write.

    A split is complete when its manifest exists (it is written last). With ``overwrite`` the
    manifest is removed first, so a crash midway leaves an (honestly) incomplete split behind.
    """
    manifest = split_dir / MANIFEST_NAME
    if manifest.exists():
        if not overwrite:
            raise FileExistsError(
                f"{split_dir} already holds a complete dataset split ({manifest}); "
                "pass overwrite=True to replace it"
            )
        manifest.unlink()
    split_dir.mkdir(parents=True, exist_ok=True)
    for leftover in split_dir.glob(f"*{TMP_SUFFIX}"):
        leftover.unlink()


class ShardSetWriter:
    """Writes one split: samples in, numbered tar shards and a manifest out.

    Use as a context manager; on an exception the shard in progress is discarded and no manifest
    is written.
    """

    def __init__(
        self,
        out_dir: str | Path,
        split: str,
        kind: str,
        samples_per_shard: int,
        *,
        first_id: int = 0,
        overwrite: bool = False,
    ) -> None:
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"split name {split!r} must match {_SPLIT_NAME.pattern} (it names files)")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if first_id < 0:
            raise ValueError(f"first_id must be >= 0, got {first_id}")
        self.split_dir = Path(out_dir) / split
        self.split = split
        self.kind = kind
        self.samples_per_shard = samples_per_shard
        self.next_id = first_id
        self.fields: set[str] = set()
        self.shards: list[dict[str, Any]] = []
        self._tar: Any = None  # webdataset.TarWriter while a shard is open
        self._tmp: Path | None = None
        self._shard_start = first_id
        prepare_split_dir(self.split_dir, overwrite)

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, fields: Mapping[str, bytes]) -> int:
        """Append one sample (field name -> encoded bytes); returns the sample id it was given."""
        if self._tar is None:
            self._open_shard()
        sample_id = self.next_id
        record = {"__key__": sample_key(sample_id), "id": str(sample_id).encode("ascii"), **fields}
        self._tar.write(record)
        self.fields.update(k for k in record if not k.startswith("__"))
        self.next_id += 1
        if self.next_id - self._shard_start >= self.samples_per_shard:
            self._close_shard()
        return sample_id

    def finish(self, metadata: dict[str, Any]) -> Path:
        """Close the last shard, drop stale shards of an overwritten split, write the manifest."""
        self._close_shard()
        if not self.shards:
            raise ValueError(f"no samples were written to {self.split_dir}")
        written = {s["path"] for s in self.shards}
        for stale in self.split_dir.glob(f"{self.split}-*.tar"):
            if stale.name not in written:
                stale.unlink()
        manifest = build_manifest_dict(self.kind, self.split, self.shards, sorted(self.fields), metadata)
        return write_manifest(self.split_dir, manifest)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _open_shard(self) -> None:
        final = self.split_dir / shard_name(self.split, len(self.shards))
        self._tmp = tmp_path_for(final)
        # Fixed mtime/owner: the same samples always give byte-identical shards. The mtime must be
        # an int: a float forces a 1 KiB PAX header per file in Python's tarfile.
        import webdataset as wds  # here: importing this module must not need webdataset

        self._tar = wds.TarWriter(str(self._tmp), encoder=False, mtime=0, user="", group="")
        self._shard_start = self.next_id

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        final = self.split_dir / shard_name(self.split, len(self.shards))
        publish(self._tmp, final)
        self._tmp = None
        self.shards.append(
            {
                "path": final.name,
                "num_samples": self.next_id - self._shard_start,
                "id_range": [self._shard_start, self.next_id],
                "bytes": final.stat().st_size,
            }
        )


# ------------------------------------------------------------------------------------ image-text data


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 [H, W, 3] (or [H, W]) -> PNG bytes (lossless, deterministic for a given Pillow)."""
    buffer = io.BytesIO()
    # Level 1: photographic/noisy images barely compress further (~4% at level 6) but encode 2.4x faster.
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_image(image: Any) -> tuple[str, bytes, tuple[int, int]]:
    """Encode a PIL image, a uint8 array or already-encoded bytes; returns (field, bytes, (h, w)).

    Encoded PNG/JPEG bytes are kept as they are (no lossy re-compression); anything else is
    decoded and stored as PNG.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            image_format = probe.format
        if image_format == "PNG":
            return "png", data, (height, width)
        if image_format == "JPEG":
            return "jpg", data, (height, width)
        with Image.open(io.BytesIO(data)) as decoded:
            image = decoded.convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise TypeError(
            "image must be a PIL image, encoded bytes or a uint8 [H, W(, 3)] array, got "
            f"{type(image).__name__}"
            + (f" {image.dtype} {image.shape}" if isinstance(image, np.ndarray) else "")
        )
    return "png", encode_png(image), (image.shape[0], image.shape[1])


_RESERVED_FIELDS = {"image", "caption", "label", "id", "txt", "cls", "png", "jpg", "jpeg"}
_EXTRA_FIELD = re.compile(r"^[a-z][a-z0-9_]*$")


def _unpack_image_text(sample: Any) -> tuple[Any, str, int | None, dict[str, bytes]]:
    """(image, caption, label, extra text fields); a dict's other keys become extra fields."""
    if isinstance(sample, Mapping):
        extra = {}
        for key, value in sample.items():
            if key in _RESERVED_FIELDS:
                continue
            if not _EXTRA_FIELD.match(str(key)):
                raise ValueError(
                    f"extra sample field {key!r} must match {_EXTRA_FIELD.pattern} (it names a file)"
                )
            extra[key] = str(value).encode("utf-8")
        return sample["image"], sample["caption"], sample.get("label"), extra
    if isinstance(sample, (tuple, list)) and len(sample) in (2, 3):
        return sample[0], sample[1], (sample[2] if len(sample) == 3 else None), {}
    raise TypeError(
        "each sample must be (image, caption), (image, caption, label) or a dict with "
        f"'image', 'caption' and optional 'label'; got {type(sample).__name__}"
    )


def write_image_text_shards(
    samples: Iterable[Any],
    out_dir: str | Path,
    split: str = "train",
    samples_per_shard: int = 256,
    *,
    metadata: dict[str, Any] | None = None,
    first_id: int = 0,
    overwrite: bool = False,
    total: int | None = None,
) -> Path:
    """Write (image, caption[, label]) samples as ``out_dir/<split>/`` shards; returns the manifest path.

    A sample given as a dict may carry more keys (lower-case names): each is stored as a UTF-8 text
    field of that name (e.g. ``freq`` of the long-tailed demo).

    ``metadata`` is stored in the manifest (e.g. ``class_names``, ``prompt_templates``, ``tokenizer``
    as a path relative to the split directory). ``image_size`` is filled in when every image is
    square and of one size, else set to null (readers must then be given an image size).
    """
    sizes: set[tuple[int, int]] = set()
    with ShardSetWriter(
        out_dir, split, "image_text", samples_per_shard, first_id=first_id, overwrite=overwrite
    ) as writer:
        for sample in progress(samples, total, f"writing {split} shards"):
            image, caption, label, extra = _unpack_image_text(sample)
            if not isinstance(caption, str):
                raise TypeError(f"caption must be a str, got {type(caption).__name__}")
            field, data, size = encode_image(image)
            sizes.add(size)
            fields = {field: data, "txt": caption.encode("utf-8")}
            if label is not None:
                fields["cls"] = str(int(label)).encode("ascii")
            writer.add(fields | extra)
        square_sizes = {h for h, w in sizes if h == w}
        image_size = square_sizes.pop() if len(sizes) == 1 and len(square_sizes) == 1 else None
        return writer.finish({"image_size": image_size, **(metadata or {})})
