"""Pretrained models and tokenizers from a local directory or a Hugging Face Hub id.

`model.pretrained` and `data.tokenizer` take what `from_pretrained` takes: a local directory
(`save_pretrained` layout) or a hub id such as `meta-llama/Llama-2-7b-chat-hf` (with
`model.revision`). A hub id is resolved to a snapshot directory of the Hugging Face cache by
`huggingface_hub.snapshot_download`, so `HF_HOME` / `HF_HUB_CACHE`, `HF_TOKEN`, `HF_ENDPOINT` and
`HF_HUB_OFFLINE` mean what they mean for transformers.

Who downloads: the driver calls `resolve_pretrained` before any worker starts (an unknown id fails
there, once). Workers call it again; on a node whose cache already holds the snapshot that is a
cache look-up, otherwise the first process of the node downloads while holding a file lock in the
cache and the others wait for it, then find the snapshot (no races, one download per node). The
model is then loaded from the snapshot directory with `local_files_only=True`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Files a transformers model or tokenizer never needs: other frameworks' weights and the original
# (non-HF) checkpoints some repos carry next to the HF ones (Llama's `original/`: another 13 GB).
_IGNORED = ["original/*", "*.pth", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.onnx_data", "*.gguf", "*.tflite"]
_IGNORED += ["flax_model*", "tf_model*", "rust_model*", "coreml/*", "onnx/*"]
_LOCK_TIMEOUT_S = 6 * 3600  # a 7B download on a slow link; a stale lock from a dead process is released


class PretrainedNotFoundError(FileNotFoundError):
    """Neither a local directory nor a hub id that could be found; the message says what was tried."""


def _looks_like_path(name: str) -> bool:
    # A hub id is `name` or `org/name`; anything with more parts, or starting like a path, is a path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _lock_path(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ".locks" / "dist_tempnet" / (repo_id.replace("/", "--") + ".lock")


def _weights_to_ignore(repo_id: str, revision: str | None) -> list[str]:
    """Skip `*.bin` when the repo also has safetensors weights (many carry both: twice the bytes)."""
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo_id, revision=revision)
    return ["*.bin"] if any(f.endswith(".safetensors") for f in files) else []


def resolve_pretrained(name: str, revision: str = "", key: str = "model.pretrained") -> Path:
    """A local directory (or file) holding `name`'s files: `name` itself if it exists locally, else the
    hub cache's snapshot of the hub id `name` at `revision` (downloaded once, under a file lock,
    unless `HF_HUB_OFFLINE=1`). Raises PretrainedNotFoundError naming `key`, `name` and what was tried.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    local = Path(name).expanduser()
    if local.exists():
        return local
    tried = f"tried: local path '{local}' (does not exist)"
    if _looks_like_path(name):
        raise PretrainedNotFoundError(f"{key}: '{name}' does not exist ({tried}; not a hub id)")
    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise PretrainedNotFoundError(
            f"{key}: '{name}' is neither a local path nor a hub id ({exc})"
        ) from None
    cache = constants.HF_HUB_CACHE
    offline = constants.is_offline_mode()
    rev = revision or None
    at = f"{name}@{revision or 'main'}"
    tried += f"; hub cache {cache} (no complete snapshot of {at})"
    from filelock import FileLock

    lock = _lock_path(name)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock), timeout=_LOCK_TIMEOUT_S):
        try:
            return Path(snapshot_download(name, revision=rev, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - any cache miss (missing, incomplete) means "download"
            cache_miss = exc
        if offline:
            raise PretrainedNotFoundError(
                f"{key}: hub id '{at}' is not in the cache and HF_HUB_OFFLINE=1 forbids downloading "
                f"({tried}; download it on a machine with hub access, e.g. `hf download {name}`, "
                f"into the same HF_HOME)"
            ) from cache_miss
        logger.info(f"{key}: downloading {at} into {cache}")
        try:
            path = snapshot_download(
                name, revision=rev, ignore_patterns=_IGNORED + _weights_to_ignore(name, rev)
            )
        except Exception as exc:  # noqa: BLE001 - not found, gated, no network: all end here
            raise PretrainedNotFoundError(
                f"{key}: cannot get hub id '{at}' ({tried}; download from "
                f"{constants.ENDPOINT} failed: {type(exc).__name__}: {exc}). Gated or private models "
                "need HF_TOKEN (or `hf auth login`)"
            ) from exc
    return Path(path)


def require_pretrained(name: str, revision: str = "", key: str = "model.pretrained") -> Path:
    """`resolve_pretrained`, and the result must be a model directory (config.json)."""
    path = resolve_pretrained(name, revision, key)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise PretrainedNotFoundError(
            f"{key}: '{name}' resolved to '{path}', which has no config.json (expected a directory "
            "written by save_pretrained, or a hub model id)"
        )
    return path
