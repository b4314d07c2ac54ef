"""Loading a checkpoint into a running engine and task, at the same or another world size.

Same world size: DeepSpeed's own `load_checkpoint` (module, optimizer partitions, scheduler,
counters). Another world size, at ZeRO stage 1, 2 or 3: the engine state is first converted into
DeepSpeed's *universal* checkpoint format (`deepspeed.checkpoint.ds_to_universal`: one file per
parameter and optimizer-state key, independent of the partitioning), and the engine, built with
`checkpoint.load_universal`, re-partitions it on load. The conversion happens once per node, in a
temporary directory, and never touches the checkpoint itself. The task re-shards its DRO state and
remaps its data position from every old rank's file; RNG states are per rank and are restored only
at the same world size.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_tempnet import comm
from dist_tempnet.runtime.checkpoint.layout import (
    load_trusted,
    read_meta,
    set_rng_state,
    verify_checkpoint,
    weights_only_loads,
)

logger = logging.getLogger(__name__)


@dataclass
class ResumePoint:
    """A complete checkpoint directory to continue from, and why: `restart` (the run's own latest
    checkpoint, e.g. after Ray restarted the workers) or `manual` (`train --resume`)."""

    directory: Path
    kind: str


def checked_meta(directory: Path) -> dict[str, Any]:
    """meta.json of a checkpoint that is complete and whose every file has the SHA-256 recorded at
    save; otherwise a clear error naming the file. Runs before anything of it is loaded."""
    verify_checkpoint(directory)
    return read_meta(directory)


def needs_universal(meta: dict[str, Any], world: int) -> bool:
    """ZeRO partitions depend on the world size: another one needs the universal format."""
    stage = int(meta["config"]["deepspeed"]["zero_stage"])
    return stage >= 1 and int(meta["world_size"]) != world


def read_task_states(rank_files: list[Path]) -> list[dict[str, Any]]:
    """The `task` part of every old rank's file, in rank order (memory-mapped: every new rank reads
    all old shards but keeps only the rows it owns)."""
    return [load_trusted(p, mmap=True)["task"] for p in rank_files]


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", comm.rank()))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _convert_to_universal(tag_dir: Path, out: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out),
        # One process: the converter's pools would fork inside a training worker.
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # torch's AdamW creates its state lazily; the converter then finds no `step` to copy.
        inject_missing_state=True,
    )
    # The converter reads DeepSpeed's files with pickle; the checkpoint was verified first, and
    # weights-only loading keeps a tampered file from running code anyway.
    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal(args)


@contextlib.contextmanager
def universal_copy(directory: Path, meta: dict[str, Any]) -> Iterator[Path]:
    """A universal-format copy of the checkpoint's engine state, as `<root>/<tag>`; yields `<root>`.

    Local rank 0 of every node converts into a node-local temporary directory whose name every rank
    derives from the checkpoint's identity (ranks may see the checkpoint under different local
    paths when Ray downloads it); the others wait. Removed again once every rank has loaded.
    """
    identity = json.dumps([meta["tag"], meta.get("saved_unix"), meta["config"]["run"]["name"]])
    digest = hashlib.sha1(identity.encode()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"dist-tempnet-universal-{digest}"
    if _local_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
        logger.info(
            "converting %s (saved by %s workers) to DeepSpeed's universal format for %s workers",
            directory,
            meta["world_size"],
            comm.world_size(),
        )
        _convert_to_universal(directory / "deepspeed" / meta["tag"], root / meta["tag"])
    _barrier()
    try:
        yield root
    finally:
        _barrier()
        if _local_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Every optimizer state tensor on its parameter's device, as torch's own `load_state_dict` does.

    A restore that builds state by hand (DeepSpeed's universal loader sets `step` from a CPU file)
    can leave tensors on the CPU; torch's fused/capturable AdamW on CUDA then refuses to step. `step`
    follows torch's rule: on the parameter's device only for fused or capturable groups.
    """
    for group in optimizer.param_groups:
        step_on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if key == "step" and not step_on_device:
                    continue
                if value.device != param.device:
                    state[key] = value.to(param.device)


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (or the engine's own, at stage 0)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", None) or opt


def _load_engine(directory: Path, meta: dict[str, Any], engine, universal_root: Path | None) -> None:
    source = universal_root if universal_root is not None else directory / "deepspeed"
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(
            str(source), tag=meta["tag"], load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise FileNotFoundError(
            f"checkpoint '{directory}': DeepSpeed found no state under {source}/{meta['tag']}"
        )
    if engine.optimizer is not None:
        align_optimizer_state(base_optimizer(engine))


def load_into(
    directory: Path, meta: dict[str, Any], engine, task, universal_root: Path | None = None
) -> dict[str, Any]:
    """Load a complete checkpoint into the engine and the task (all ranks); returns its meta + path.

    `universal_root`: the `universal_copy` of the checkpoint, when the world size changed (the
    engine must then have been built with `checkpoint.load_universal`).
    """
    directory = Path(directory)
    _load_engine(directory, meta, engine, universal_root)
    old_world = int(meta["world_size"])
    rank_files = [directory / f"rank_{r}.pt" for r in range(old_world)]
    task.load_state(read_task_states(rank_files), old_world)
    if old_world == comm.world_size():
        own = directory / f"rank_{comm.rank()}.pt"
        set_rng_state(load_trusted(own)["rng"])
    return meta | {"path": str(directory)}
