"""Atomic file writes: readers either see the old complete file or the new complete file, never a
half-written one (a crashed writer leaves only a ``*.tmp`` file behind)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(path.name + TMP_SUFFIX)


def publish(tmp_path: Path, final_path: Path) -> None:
    """Flush ``tmp_path`` to disk and rename it onto ``final_path`` (atomic on POSIX)."""
    with open(tmp_path, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp_path, final_path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = tmp_path_for(path)
    try:
        tmp.write_bytes(data)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    # sort_keys + fixed indent: the same content always gives the same bytes (determinism tests).
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))
