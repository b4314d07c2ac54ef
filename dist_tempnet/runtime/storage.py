"""Run outputs and checkpoints on an object store (`s3://bucket/prefix`, `gs://…`, any fsspec URI).

Ray Train writes checkpoints to `RunConfig(storage_path, storage_filesystem)` natively; this module
builds that filesystem from the URI, checks it is reachable before any worker starts, and copies a
remote checkpoint to a local directory so that `--resume`, `eval` and `export` keep one (local) code
path.

Credentials come from the usual places (pyarrow/AWS SDK read AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, ~/.aws/credentials); an S3-compatible server (MinIO, moto, Ceph) is chosen with
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL. Keys are never put into the filesystem object itself, because
Ray pickles it to the workers: they read the same environment variables (the launcher forwards them).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

# Environment variables the object store client reads; forwarded to Ray workers.
STORAGE_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


class StorageError(RuntimeError):
    """An object store URI that cannot be used (unknown scheme, unreachable, missing bucket)."""


def is_uri(path: str | Path) -> bool:
    """Whether `path` names a remote filesystem (`scheme://…`), not a local path or `file://`."""
    scheme = urlparse(str(path)).scheme
    return "://" in str(path) and len(scheme) > 1 and scheme != "file"


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a remote URI."""
    import pyarrow.fs as pafs

    parsed = urlparse(uri)
    path = (parsed.netloc + parsed.path).rstrip("/")
    if parsed.scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        kwargs = {}
        if endpoint:
            ep = urlparse(endpoint)
            kwargs = {"endpoint_override": ep.netloc or ep.path, "scheme": ep.scheme or "https"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        # Fail in seconds, not minutes, when the store is down: Ray retries a failed upload by
        # restarting the workers anyway.
        return pafs.S3FileSystem(connect_timeout=5, request_timeout=30, **kwargs), path
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    except (ValueError, OSError):  # ArrowInvalid is a ValueError
        pass
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise StorageError(
            f"'{uri}': no pyarrow or fsspec filesystem for scheme '{parsed.scheme}' ({exc})"
        ) from exc
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def check_writable(uri: str) -> None:
    """Create `uri` (a directory) and write/delete a marker there; StorageError naming the URI and
    the endpoint otherwise. Run by the driver before any worker starts."""
    import pyarrow as pa

    fs, path = filesystem(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "default"
    marker = f"{path}/.dist-tempnet-write-check"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(marker) as out:
            out.write(b"ok")
        fs.delete_file(marker)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(
            f"run.output_dir={uri!r}: cannot write to the object store (endpoint {endpoint}): "
            f"{str(exc).splitlines()[0][:300]}. Check AWS_ENDPOINT_URL / credentials / the bucket."
        ) from exc


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _children(fs, path: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def _exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _exists(fs, path)


def _download(fs, path: str, dest: Path) -> Path:
    import pyarrow.fs as pafs

    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def _scratch() -> Path:
    d = Path(tempfile.mkdtemp(prefix="dist-tempnet-remote-ckpt-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def fetch_checkpoint(uri: str, dest: Path | None = None) -> Path | None:
    """Copy a remote checkpoint to a local directory and return it: `uri` is a checkpoint directory,
    or a run directory (`…/ray/<name>` or `…/checkpoints`) whose newest complete `step_*` is taken.
    None when there is none. The copy lives until the process exits unless `dest` is given."""
    from dist_tempnet.runtime.checkpoint import COMPLETE, META, is_complete

    fs, path = filesystem(uri)
    dest = dest or _scratch()
    if _exists(fs, f"{path}/{META}") or _exists(fs, f"{path}/{COMPLETE}"):
        local = _download(fs, path, dest / Path(path).name)
        logger.info(f"copied checkpoint {uri} → {local}")
        return local
    for root in (path, f"{path}/checkpoints"):
        for name in reversed([n for n in _children(fs, root) if n.startswith("step_")]):
            local = _download(fs, f"{root}/{name}", dest / name)
            if is_complete(local):
                logger.info(f"copied checkpoint {uri}/{name} → {local}")
                return local
            shutil.rmtree(local, ignore_errors=True)
    return None


def local_checkpoint(path: str | Path) -> Path:
    """`path` itself when local; for a URI, a local copy of that checkpoint (or of the newest complete
    one below it). StorageError when the URI holds none."""
    if not is_uri(path):
        return Path(path).expanduser()
    local = fetch_checkpoint(str(path))
    if local is None:
        raise StorageError(f"'{path}' holds no complete checkpoint (meta.json + COMPLETE, or step_* ones)")
    return local


def scheme_of(uri: str) -> str:
    return urlparse(uri).scheme
