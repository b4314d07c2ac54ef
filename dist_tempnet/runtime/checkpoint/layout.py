"""Checkpoint layout: what one checkpoint directory holds, how it is written, when it is complete.

    deepspeed/<tag>/...     engine.save_checkpoint (model, optimizer, scheduler; per-rank shards)
    rank_<r>.pt             this rank's task state (DRO state shard, exact data position) and RNG states
    meta.json               step, world size, tag, config, metrics, MLflow run id and tracking URI
    files_rank_<r>.json     every file rank r wrote, with its size and SHA-256 (written after them)
    COMPLETE                written by rank 0 after its own files

A directory counts as a checkpoint only when `is_complete` holds: COMPLETE, meta.json, and for each
of the `world_size` ranks its file list with every listed file present at the listed size. Under
Ray, ranks upload their files independently, so a rank killed mid-save leaves a directory that has
rank 0's COMPLETE but not the other lists: it is never loaded nor picked as the latest.

Trust: nothing in a checkpoint is executed. Before anything is loaded, `verify_checkpoint` checks
every listed file's SHA-256 (bit rot, truncation, a partial copy, an edited file); our files are
then read with `load_trusted` (torch.load(weights_only=True): tensors and plain types only), and
DeepSpeed's own loads, which hard-code weights_only=False in 0.19.8, run under `weights_only_loads`.
The digests catch accidents, not an attacker who can also rewrite the file lists: weights_only is
what keeps a crafted file from running code.

DeepSpeed keeps `client_state` for every rank only under ZeRO-3, hence our own rank files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_tempnet import comm
from dist_tempnet.config import CheckpointError
from dist_tempnet.runtime.faults import FaultPlan

COMPLETE = "COMPLETE"
META = "meta.json"


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain types, so that they load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next): plain types
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    """Write `data` to `path` atomically; returns its file-list entry (size and SHA-256 of the bytes
    written, so our own files cost no second read)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- writing ----------------------------------------------------------------------------------


def _owner_of(name: str, world: int) -> int:
    """Which rank wrote a DeepSpeed file: ZeRO shards carry `zero_pp_rank_<r>_`, the rest is rank 0's."""
    for r in range(world):
        if f"zero_pp_rank_{r}_" in name:
            return r
    return 0


def _list_own_files(directory: Path, rank: int, world: int, written: dict[str, dict]) -> dict[str, dict]:
    """`written` (our files, hashed as written) plus this rank's DeepSpeed files, hashed here: DeepSpeed
    writes them itself (they were just written, so this reads the page cache)."""
    files = dict(written)
    ds_root = directory / "deepspeed"
    for path in sorted(p for p in ds_root.rglob("*") if p.is_file()):
        if _owner_of(path.name, world) == rank and not path.name.endswith(".tmp"):
            rel = str(path.relative_to(directory))
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def write_rank_files(
    directory: Path,
    engine,
    step: int,
    task_state: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, float],
    extra: dict[str, Any],
    fault: FaultPlan | None = None,
) -> str:
    """Every rank calls this with its own (or a shared) directory; returns the DeepSpeed tag.

    The rank's file list is written last: until it exists the rank's part is not complete.
    """
    tag = f"step_{step:08d}"
    rank, world = comm.rank(), comm.world_size()
    engine.save_checkpoint(str(directory / "deepspeed"), tag=tag, save_latest=True)
    payload = {"task": task_state, "rng": rng_state(), "step": step, "rank": rank, "world_size": world}
    written = {}
    with tempfile.SpooledTemporaryFile() as buf:
        torch.save(payload, buf)
        buf.seek(0)
        written[f"rank_{rank}.pt"] = _atomic_write_bytes(directory / f"rank_{rank}.pt", buf.read())
    if rank == 0:
        meta = {"step": step, "tag": tag, "world_size": world, "config": config, "metrics": metrics, **extra}
        text = json.dumps(meta, indent=1, default=str)
        written[META] = _atomic_write_bytes(directory / META, text.encode())
    (fault or FaultPlan()).in_save(step, rank)
    files = _list_own_files(directory, rank, world, written)
    _atomic_write_bytes(directory / f"files_rank_{rank}.json", json.dumps(files, indent=1).encode())
    return tag


# -- reading ----------------------------------------------------------------------------------


def read_meta(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    meta_path = directory / META
    if not (directory / COMPLETE).is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint '{directory}' is incomplete (no {COMPLETE} marker or {META})")
    return json.loads(meta_path.read_text())


def _listed_files(directory: Path, rank: int) -> dict[str, dict[str, Any]]:
    """Rank `rank`'s file list: {relative path: {"size": bytes, "sha256": hex}} (lists written
    before checksums were recorded map a path to its size alone: no "sha256")."""
    listing = json.loads((directory / f"files_rank_{rank}.json").read_text())
    return {rel: entry if isinstance(entry, dict) else {"size": entry} for rel, entry in listing.items()}


def missing_parts(directory: Path) -> list[str]:
    """What keeps `directory` from being a complete checkpoint (empty: it is complete). Sizes only:
    cheap enough to scan every checkpoint of a run; `verify_checkpoint` checks the contents."""
    directory = Path(directory)
    try:
        meta = read_meta(directory)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        return [str(exc)]
    problems = []
    for rank in range(int(meta["world_size"])):
        listing = directory / f"files_rank_{rank}.json"
        if not listing.is_file():
            problems.append(f"{listing.name} (rank {rank} did not finish its save)")
            continue
        for rel, entry in _listed_files(directory, rank).items():
            path = directory / rel
            if not path.is_file():
                problems.append(f"{rel} (missing)")
            elif path.stat().st_size != entry["size"]:
                problems.append(f"{rel} ({path.stat().st_size} bytes, expected {entry['size']})")
    return problems


# Files whose digest matched, by (path, size, mtime): a process that verifies a checkpoint and then
# loads from it (or loads one file twice) reads each file for its digest once.
_verified: set[tuple[str, int, int]] = set()


def _verify_file(directory: Path, rel: str, entry: dict[str, Any]) -> None:
    path = directory / rel
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return
    expected = entry.get("sha256")
    if not expected:
        raise CheckpointError(
            f"checkpoint '{directory}': {rel} has no SHA-256 in its file list (written before dist-tempnet "
            "recorded checksums), so its contents cannot be verified; not loaded"
        )
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint '{directory}': {rel} is not the file that was saved: SHA-256 {actual}, "
            f"expected {expected} (files_rank_*.json); not loaded"
        )
    if path.suffix == ".pt" and zipfile.is_zipfile(path):  # torch.save's format (others: left to load)
        _check_pickle_globals(path)
    _verified.add(key)


def _check_pickle_globals(path: Path) -> None:
    """Name the file and the code a .pt file would import, without running anything (a static scan
    of its pickle; the weights_only loads stay the guard, this names what they would refuse)."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(
                f"refused to load '{path}': not a readable torch.save file ({exc})"
            ) from exc
    if unsafe:
        raise CheckpointError(
            f"refused to load '{path}': it references {sorted(unsafe)}, which a checkpoint of tensors "
            "and plain types never does (loading it could run code); not loaded"
        )


def verify_checkpoint(directory: Path) -> None:
    """Raise CheckpointError naming the first file that is missing, of another size, or whose SHA-256
    differs from the one recorded at save. Call before anything of `directory` is loaded."""
    directory = Path(directory)
    problems = missing_parts(directory)
    if problems:
        raise CheckpointError(f"checkpoint '{directory}' is incomplete: {', '.join(problems[:5])}")
    for rank in range(int(read_meta(directory)["world_size"])):
        for rel, entry in _listed_files(directory, rank).items():
            _verify_file(directory, rel, entry)


def _checkpoint_of(path: Path) -> tuple[Path, str, dict[str, Any]]:
    """(checkpoint directory, path relative to it, file-list entry) of a file inside a checkpoint."""
    for directory in path.parents:
        if (directory / META).is_file():
            rel = str(path.relative_to(directory))
            world = int(read_meta(directory)["world_size"])
            for rank in range(world):
                listing = directory / f"files_rank_{rank}.json"
                if listing.is_file() and rel in (files := _listed_files(directory, rank)):
                    return directory, rel, files[rel]
            raise CheckpointError(f"checkpoint '{directory}': {rel} is in no files_rank_*.json; not loaded")
    raise CheckpointError(f"'{path}' is not inside a checkpoint directory (no {META} above it); not loaded")


def load_trusted(path: Path, mmap: bool = False) -> Any:
    """torch.load of a file of one of our checkpoints: its SHA-256 checked against the checkpoint's
    file list first, then loaded with weights_only=True, so that it can hold tensors and plain types
    but no code (and the few DeepSpeed state classes of its ZeRO files). The one way our checkpoint
    files are read."""
    path = Path(path)
    directory, rel, entry = _checkpoint_of(path)
    _verify_file(directory, rel, entry)
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_refusal(path, exc)) from exc


def _refusal(path: Path | str, exc: Exception) -> str:
    # torch's message is a page of advice; keep its one line saying what was refused.
    found = re.search(r"WeightsUnpickler error: (.*)", str(exc))
    detail = found.group(1).split(". ")[0] if found else str(exc).strip()[:200]
    return (
        f"refused to load '{path}': it holds objects other than tensors and plain types (weights_only "
        f"load: {detail}). A checkpoint is data; a file that needs code to load was not written by "
        "dist-tempnet"
    )


# The classes DeepSpeed 0.19.8 pickles into its ZeRO optimizer files (found with
# torch.serialization.get_unsafe_globals_in_checkpoint); plain state holders, no code runs on load.
def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Make every torch.load inside weights_only=True, for DeepSpeed's loads (engine.load_checkpoint,
    zero_to_fp32), which pass weights_only=False with no way to change it in 0.19.8. torch reads
    TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call and it wins over the argument; the few DeepSpeed
    classes its files hold are allow-listed. A refused file raises CheckpointError."""
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_refusal("a DeepSpeed file of the checkpoint", exc)) from exc
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def is_complete(directory: Path) -> bool:
    return Path(directory).is_dir() and not missing_parts(directory)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step_*` checkpoints directly under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if is_complete(p)), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def retained_checkpoints(
    found: list[Path], keep_last: int, best_metric: str = "", mode: str = "max"
) -> set[Path]:
    """The newest `keep_last` checkpoints plus, with `best_metric`, the best one by that metric."""
    keep = set(found[-keep_last:])
    if best_metric:
        scored = []
        for path in found:
            value = read_meta(path).get("metrics", {}).get(best_metric)
            if isinstance(value, (int, float)) and value == value:
                scored.append((value if mode == "max" else -value, path.name, path))
        if scored:
            keep.add(max(scored)[2])
    return keep
