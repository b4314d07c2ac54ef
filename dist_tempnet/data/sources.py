"""Where shards live: a directory, a brace pattern, a list, or URLs -- opened through the libraries.

A *source* is what users write in ``data.path`` or pass to ``index-shards``: a local directory of
``*.tar`` files, a file or URL with brace ranges (``cc12m/{00000..01242}.tar``), several of those
joined by ``::`` (webdataset's convention) or given as a list, and URLs of any scheme that
webdataset's ``gopen`` opens (``https://`` via curl, ``pipe:CMD``, ``gs://`` via gsutil) or that
fsspec opens (``s3://``, ``gs://``, ``az://``; those need the optional s3fs / gcsfs / adlfs).
Nothing here opens a URL with ``open(path)``.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

# Schemes read through fsspec, and the package fsspec needs for each (optional extras).
FSSPEC_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
STATS_SUFFIX = "_stats.json"


def scheme(url: str) -> str:
    """The URL scheme ('' for a local path; 'pipe' for ``pipe:CMD``)."""
    if url.startswith("pipe:"):
        return "pipe"
    return urlparse(url).scheme if "://" in url else ""


def is_remote(url: str) -> bool:
    return scheme(url) not in ("", "file")


def local_path(url: str) -> Path:
    return Path(urlparse(url).path) if url.startswith("file://") else Path(url)


def _fsspec_open(url: str) -> IO[bytes]:
    import fsspec

    package = FSSPEC_PACKAGES[scheme(url)]
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as exc:
        raise ImportError(
            f"{url}: reading {scheme(url)}:// URLs needs the optional package {package!r} "
            f"(pip install {package}, or pip install 'dist-tempnet[cloud]')"
        ) from exc


def open_url(url: str) -> IO[bytes]:
    """Open a local path or URL for reading, through fsspec (object stores) or webdataset's gopen."""
    if scheme(url) in FSSPEC_PACKAGES:
        return _fsspec_open(url)
    import webdataset as wds  # here: importing this module must not need webdataset

    return wds.gopen(url, "rb")


def read_bytes(url: str) -> bytes:
    with open_url(url) as handle:
        return handle.read()


def exists(url: str) -> bool:
    """Whether a small side file (``_stats.json``, ``dataset.json``) can be read at ``url``."""
    if not is_remote(url):
        return local_path(url).is_file()
    if scheme(url) == "pipe":
        return False
    try:
        read_bytes(url)
    except (OSError, ValueError, FileNotFoundError):
        return False
    return True


def join(base: str, relative: str) -> str:
    """``relative`` resolved against the directory URL/path ``base`` (absolute ones kept)."""
    if is_remote(relative) or Path(relative).is_absolute():
        return relative
    if is_remote(base):
        parsed = urlparse(base)
        return parsed._replace(path=posixpath.normpath(posixpath.join(parsed.path, relative))).geturl()
    return str((Path(base) / relative).resolve())


def dirname(url: str) -> str:
    if is_remote(url):
        parsed = urlparse(url)
        return parsed._replace(path=posixpath.dirname(parsed.path)).geturl()
    return str(Path(url).resolve().parent)


def stats_url(shard_url: str) -> str | None:
    """img2dataset's ``_stats.json`` beside a ``.tar`` shard (None for other names)."""
    return shard_url[: -len(".tar")] + STATS_SUFFIX if shard_url.endswith(".tar") else None


def _expand_one(url: str) -> list[str]:
    if not is_remote(url):
        path = local_path(url)
        if path.is_dir():
            found = sorted(str(p.resolve()) for p in path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"{path}: directory holds no *.tar shards")
            return found
        return [str(path.resolve())]
    if scheme(url) in FSSPEC_PACKAGES and (url.endswith("/") or any(c in url for c in "*?[")):
        import fsspec

        pattern = url.rstrip("/") + "/*.tar" if url.endswith("/") else url
        try:
            fs, _, paths = fsspec.get_fs_token_paths(pattern)
        except ImportError as exc:
            package = FSSPEC_PACKAGES[scheme(url)]
            raise ImportError(f"{url}: listing needs the optional package {package!r}") from exc
        return sorted(fs.unstrip_protocol(p) for p in paths)
    return [url]


def expand_source(source: str | Path | list[Any] | tuple[Any, ...]) -> list[str]:
    """All shard URLs of a source, in order (brace ranges and ``::`` lists expanded by webdataset;
    directories listed, sorted). Local paths come back absolute: Ray workers run elsewhere."""
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    urls: list[str] = []
    for item in items:
        from webdataset.shardlists import expand_urls  # lazy, see open_url

        for url in expand_urls(str(item)):
            urls.extend(_expand_one(url))
    if not urls:
        raise ValueError(f"shard source {source!r} names no shards")
    duplicates = {u for u, n in Counter(urls).items() if n > 1}
    if duplicates:
        raise ValueError(
            f"shard source {source!r} names these shards more than once: {sorted(duplicates)[:5]}"
        )
    return urls
