"""The ``dataset.json`` manifest written next to every split's shards, and its validation.

Schema (version 1)::

    {
      "format": "dist_tempnet.shards", "version": 1,
      "kind": "image_text" | "tokens",
      "split": "train",
      "num_samples": 4096,                 # sum over shards
      "id_range": [0, 4096],               # half-open; sample ids are contiguous across shards
      "fields": ["cls", "id", "png", "txt"],
      "shards": [{"path": "train-000000.tar", "num_samples": 256, "id_range": [0, 256],
                  "bytes": 123456}, ...],  # path relative to the manifest's directory
      "metadata": {...}                    # kind-specific, see _METADATA_RULES
    }

The manifest is written last and atomically, so its presence is what marks a split as complete.

Version 2 is the same object written by ``dist-tempnet index-shards`` for shards it did not write
(img2dataset output, anything webdataset reads): shard ``path`` may be a URL, ``fields`` may be empty,
a shard may hold 0 samples, and an entry may carry ``failed`` (samples img2dataset counted as failed).
In both versions a sample's id is its shard's ``id_range[0]`` plus its position in the shard (demo
shards additionally store that id in each sample). The index is O(shards), never O(samples), and
appending shards appends ids, so existing ids never change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_tempnet.data.atomic import write_json_atomic
from dist_tempnet.data.sources import dirname, is_remote, join, local_path, read_bytes

MANIFEST_NAME = "dataset.json"
FORMAT_NAME = "dist_tempnet.shards"
FORMAT_VERSION = 1  # what make-shards writes
INDEX_VERSION = 2  # what index-shards writes
VERSIONS = (FORMAT_VERSION, INDEX_VERSION)
KINDS = ("image_text", "tokens")
REQUIRED_FIELDS = {"image_text": ("id", "txt"), "tokens": ("id", "ids.npy")}
IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")


class ManifestError(ValueError):
    """A manifest is malformed; the message names the file and the offending key."""


@dataclass(frozen=True)
class ShardInfo:
    url: str  # absolute local path or URL (see data.sources)
    num_samples: int  # slots: a sample's id is id_start + its position in the shard
    id_start: int
    id_stop: int  # exclusive
    num_bytes: int | None = None
    failed: int = 0  # samples img2dataset (or the indexer) found unusable; their slots stay unused

    @property
    def path(self) -> Path:
        """The local file (only for local shards)."""
        return local_path(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Manifest:
    path: Path  # the dataset.json file
    kind: str
    split: str
    num_samples: int
    id_start: int
    id_stop: int
    fields: tuple[str, ...]
    shards: tuple[ShardInfo, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION
    location: str = ""  # the URL or path it was read from

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return self.location or str(self.path)

    def resolve(self, relative: str | None) -> Path | None:
        """Resolve a path stored in the metadata (relative to the manifest's directory)."""
        if relative is None:
            return None
        candidate = Path(relative)
        return candidate if candidate.is_absolute() else (self.dir / candidate).resolve()

    @property
    def tokenizer_path(self) -> Path | None:
        return self.resolve(self.metadata.get("tokenizer"))

    @property
    def image_size(self) -> int | None:
        return self.metadata.get("image_size")

    @property
    def seq_len(self) -> int | None:
        return self.metadata.get("seq_len")


def build_manifest_dict(
    kind: str,
    split: str,
    shards: list[dict[str, Any]],
    fields: list[str],
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """Assemble the JSON object for a finished split (shard entries as written by the writer)."""
    num_samples = sum(s["num_samples"] for s in shards)
    id_start = shards[0]["id_range"][0] if shards else 0
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "split": split,
        "num_samples": num_samples,
        "id_range": [id_start, id_start + num_samples],
        "fields": sorted(fields),
        "shards": shards,
        "metadata": metadata,
    }


def write_manifest(split_dir: Path, manifest: dict[str, Any]) -> Path:
    path = Path(split_dir) / MANIFEST_NAME
    _validate(manifest, path)  # never publish a manifest we would refuse to read
    write_json_atomic(path, manifest)
    return path


def read_manifest(dir_or_json: str | Path) -> Manifest:
    """Read and validate a split's manifest (the ``dataset.json`` file or the directory holding it)."""
    if is_remote(str(dir_or_json)):
        return _read_remote_manifest(str(dir_or_json))
    path = Path(dir_or_json)
    if path.is_dir() or path.suffix != ".json":
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no dataset manifest at {path} (is the split complete? it is written last)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    _validate(raw, path)
    return _to_manifest(raw, path.resolve(), str(path.resolve().parent))


def manifest_from_dict(raw: dict[str, Any], name: str) -> Manifest:
    """A manifest held in memory (absolute shard URLs), validated like a stored one."""
    _validate(raw, Path(name))
    return _to_manifest(raw, Path(name), "/", location=name)


def _read_remote_manifest(url: str) -> Manifest:
    """An index read by URL (https://, s3://, ...); relative shard paths are relative to its URL."""
    if not url.endswith(".json"):
        url = url.rstrip("/") + "/" + MANIFEST_NAME
    try:
        data = read_bytes(url)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no dataset manifest at {url} ({exc})") from exc
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{url}: not valid JSON ({exc})") from exc
    _validate(raw, Path(url))
    return _to_manifest(raw, Path(url), dirname(url), location=url)


def resolve_manifest(
    manifest_or_dir: str | Path | list[str] | Manifest,
    split: str | None = None,
    default_split: str | None = None,
) -> Manifest:
    """Find a split's manifest from a Manifest, a dataset.json path, a split dir or a dataset root.

    A dataset root holds one sub-directory per split (``root/train/dataset.json``); there ``split``
    (or else ``default_split``) picks the sub-directory. An explicit ``split`` must match the
    manifest found; with ``split=None`` a Manifest, file or split directory is taken as it is.
    """
    if isinstance(manifest_or_dir, Manifest):
        manifest = manifest_or_dir
    elif not _names_a_manifest(manifest_or_dir):
        # Shards without an index (a directory of img2dataset tars, a brace pattern, URLs): the
        # index is built from their _stats.json files, or the error says to run index-shards.
        from dist_tempnet.data.index import index_without_reading

        manifest = index_without_reading(manifest_or_dir, split=split or default_split or "train")
    elif is_remote(str(manifest_or_dir)):
        manifest = read_manifest(str(manifest_or_dir))
    else:
        path = Path(manifest_or_dir)
        wanted = split or default_split
        if wanted is not None and (path / wanted / MANIFEST_NAME).is_file():
            path = path / wanted
        elif path.is_dir() and not (path / MANIFEST_NAME).is_file():
            looked = path / (wanted or "<split>") / MANIFEST_NAME
            raise FileNotFoundError(f"no dataset manifest at {looked} or {path / MANIFEST_NAME}")
        manifest = read_manifest(path)
    if split is not None and manifest.split != split:
        raise ValueError(f"{manifest.path}: holds split {manifest.split!r}, but split {split!r} was asked")
    return manifest


def _names_a_manifest(source: Any) -> bool:
    """Whether ``source`` is (or holds) a dataset.json rather than bare shards."""
    if isinstance(source, (list, tuple)):
        return False
    text = str(source)
    if is_remote(text):
        return text.endswith(".json") or text.endswith("/")
    if any(c in text for c in "{}") or "::" in text or text.endswith(".tar"):
        return False
    path = Path(text)
    return not (path.is_dir() and not (path / MANIFEST_NAME).exists() and any(path.glob("*.tar")))


# ----------------------------------------------------------------------------------------- validation


def _fail(path: Path, key: str, expected: str, got: Any) -> ManifestError:
    return ManifestError(f"{path}: key {key!r}: expected {expected}, got {got!r}")


def _require(
    obj: dict[str, Any], key: str, check: Callable[[Any], bool], expected: str, path: Path, prefix: str = ""
) -> Any:
    full_key = f"{prefix}{key}"
    if key not in obj:
        raise ManifestError(f"{path}: missing key {full_key!r} ({expected})")
    value = obj[key]
    if not check(value):
        raise _fail(path, full_key, expected, value)
    return value


def _is_int(x: Any, minimum: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def _is_range(x: Any) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(_is_int(v) for v in x) and x[0] <= x[1]


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _is_optional_str(x: Any) -> bool:
    return x is None or isinstance(x, str)


def _are_prompt_templates(x: Any) -> bool:
    return _is_str_list(x) and all("{}" in t for t in x)


# Kind-specific metadata keys: (key, required, check, description).
_METADATA_RULES: dict[str, list[tuple[str, bool, Callable[[Any], bool], str]]] = {
    "image_text": [
        ("image_size", False, lambda x: x is None or _is_int(x, 1), "an int >= 1 (square images) or null"),
        ("tokenizer", False, _is_optional_str, "a path string or null"),
        ("class_names", False, _is_str_list, "a list of strings"),
        ("prompt_templates", False, _are_prompt_templates, "a list of strings each containing '{}'"),
    ],
    "tokens": [
        ("seq_len", True, lambda x: _is_int(x, 1), "an int >= 1 (each sample holds seq_len + 1 tokens)"),
        ("tokenizer", False, _is_optional_str, "a path string or null"),
        ("vocab_size", False, lambda x: _is_int(x, 1), "an int >= 1"),
    ],
}


def _validate(raw: Any, path: Path) -> None:
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a JSON object at the top level, got {type(raw).__name__}")
    _require(raw, "format", lambda x: x == FORMAT_NAME, repr(FORMAT_NAME), path)
    version = _require(raw, "version", lambda x: x in VERSIONS, f"one of {VERSIONS}", path)
    kind = _require(raw, "kind", lambda x: x in KINDS, f"one of {KINDS}", path)
    _require(raw, "split", lambda x: isinstance(x, str) and x != "", "a non-empty string", path)
    num_samples = _require(raw, "num_samples", _is_int, "an int >= 0", path)
    id_range = _require(raw, "id_range", _is_range, "[start, stop] with 0 <= start <= stop", path)
    fields = _require(raw, "fields", _is_str_list, "a list of field names", path)
    if version == FORMAT_VERSION:  # an index of shards written elsewhere need not know their fields
        for needed in REQUIRED_FIELDS[kind]:
            if needed not in fields:
                raise _fail(path, "fields", f"a list containing {needed!r} for kind {kind!r}", fields)
        if kind == "image_text" and not any(f in fields for f in IMAGE_FIELDS):
            raise _fail(path, "fields", f"a list containing one image field of {IMAGE_FIELDS}", fields)
    shards = _require(raw, "shards", lambda x: isinstance(x, list) and len(x) > 0, "a non-empty list", path)
    _validate_shards(shards, id_range, num_samples, path, min_count=0 if version == INDEX_VERSION else 1)
    metadata = _require(raw, "metadata", lambda x: isinstance(x, dict), "an object", path)
    for key, required, check, expected in _METADATA_RULES[kind]:
        if key in metadata or required:
            _require(metadata, key, check, expected, path, prefix="metadata.")


def _validate_shards(
    shards: list[Any], id_range: list[int], num_samples: int, path: Path, min_count: int = 1
) -> None:
    next_id = id_range[0]
    for i, shard in enumerate(shards):
        prefix = f"shards[{i}]."
        if not isinstance(shard, dict):
            raise _fail(path, f"shards[{i}]", "an object", shard)
        _require(shard, "path", lambda x: isinstance(x, str) and x != "", "a non-empty path", path, prefix)
        count = _require(
            shard, "num_samples", lambda x: _is_int(x, min_count), f"an int >= {min_count}", path, prefix
        )
        start, stop = _require(shard, "id_range", _is_range, "[start, stop]", path, prefix)
        if start != next_id or stop - start != count:
            raise _fail(
                path, f"{prefix}id_range", f"[{next_id}, {next_id + count}] (contiguous ids)", [start, stop]
            )
        if "bytes" in shard:
            _require(shard, "bytes", lambda x: _is_int(x, 1), "an int >= 1", path, prefix)
        if "failed" in shard:
            _require(shard, "failed", _is_int, "an int >= 0", path, prefix)
        next_id = stop
    total = next_id - id_range[0]
    if total != num_samples:
        raise _fail(path, "num_samples", f"{total} (the sum over shards)", num_samples)
    if id_range[1] != next_id:
        raise _fail(path, "id_range", f"[{id_range[0]}, {next_id}]", id_range)


def _to_manifest(raw: dict[str, Any], path: Path, base: str, location: str = "") -> Manifest:
    shards = tuple(
        ShardInfo(
            url=join(base, s["path"]),
            num_samples=s["num_samples"],
            id_start=s["id_range"][0],
            id_stop=s["id_range"][1],
            num_bytes=s.get("bytes"),
            failed=s.get("failed", 0),
        )
        for s in raw["shards"]
    )
    return Manifest(
        path=path,
        kind=raw["kind"],
        split=raw["split"],
        num_samples=raw["num_samples"],
        id_start=raw["id_range"][0],
        id_stop=raw["id_range"][1],
        fields=tuple(raw["fields"]),
        shards=shards,
        metadata=dict(raw["metadata"]),
        version=raw["version"],
        location=location,
    )
