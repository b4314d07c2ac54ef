"""Checkpoint layout: what one checkpoint directory holds, how it is written, when it is complete.

    deepspeed/<tag>/...     engine.save_checkpoint (model, optimizer, scheduler; per-rank shards)
    rank_<r>.pt             this rank's task state (DRO state shard, exact data position) and RNG states
    meta.json               step, world size, tag, config, metrics, MLflow run id and tracking URI
    files_rank_<r>.json     every file rank r wrote, with its size (written after them)
    COMPLETE                written by rank 0 after its own files

A directory counts as a checkpoint only when `is_complete` holds: COMPLETE, meta.json, and for each
of the `world_size` ranks its file list with every listed file present at the listed size. Under
Ray, ranks upload their files independently, so a rank killed mid-save leaves a directory that has
rank 0's COMPLETE but not the other lists: it is never loaded nor picked as the latest.

DeepSpeed keeps `client_state` for every rank only under ZeRO-3, hence our own rank files.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_tempnet import comm
from dist_tempnet.runtime.faults import FaultPlan

COMPLETE = "COMPLETE"
META = "meta.json"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- writing ----------------------------------------------------------------------------------


def _owner_of(name: str, world: int) -> int:
    """Which rank wrote a DeepSpeed file: ZeRO shards carry `zero_pp_rank_<r>_`, the rest is rank 0's."""
    for r in range(world):
        if f"zero_pp_rank_{r}_" in name:
            return r
    return 0


def _list_own_files(directory: Path, rank: int, world: int) -> dict[str, int]:
    files = {f"rank_{rank}.pt": (directory / f"rank_{rank}.pt").stat().st_size}
    if rank == 0:
        files[META] = (directory / META).stat().st_size
    ds_root = directory / "deepspeed"
    for path in sorted(p for p in ds_root.rglob("*") if p.is_file()):
        if _owner_of(path.name, world) == rank and not path.name.endswith(".tmp"):
            files[str(path.relative_to(directory))] = path.stat().st_size
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
    with tempfile.SpooledTemporaryFile() as buf:
        torch.save(payload, buf)
        buf.seek(0)
        _atomic_write_bytes(directory / f"rank_{rank}.pt", buf.read())
    if rank == 0:
        meta = {"step": step, "tag": tag, "world_size": world, "config": config, "metrics": metrics, **extra}
        _atomic_write_bytes(directory / META, json.dumps(meta, indent=1, default=str).encode())
    (fault or FaultPlan()).in_save(step, rank)
    files = _list_own_files(directory, rank, world)
    _atomic_write_bytes(directory / f"files_rank_{rank}.json", json.dumps(files, indent=1).encode())
    return tag


# -- reading ----------------------------------------------------------------------------------


def read_meta(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    meta_path = directory / META
    if not (directory / COMPLETE).is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint '{directory}' is incomplete (no {COMPLETE} marker or {META})")
    return json.loads(meta_path.read_text())


def missing_parts(directory: Path) -> list[str]:
    """What keeps `directory` from being a complete checkpoint (empty: it is complete)."""
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
        for rel, size in json.loads(listing.read_text()).items():
            path = directory / rel
            if not path.is_file():
                problems.append(f"{rel} (missing)")
            elif path.stat().st_size != size:
                problems.append(f"{rel} ({path.stat().st_size} bytes, expected {size})")
    return problems


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
