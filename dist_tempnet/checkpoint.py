"""Checkpoints: DeepSpeed engine state + one file per rank (task state, RNG) + metadata.

Layout of one checkpoint directory:

    deepspeed/<tag>/...     engine.save_checkpoint (model, optimizer, scheduler; per-rank shards)
    rank_<r>.pt             this rank's task state (DRO state shard, data position) and RNG states
    meta.json               step, world size, tag, config, metrics, MLflow run id
    COMPLETE                written last: a directory without it is never loaded

DeepSpeed keeps `client_state` for every rank only under ZeRO-3, hence our own rank files.

Two sinks. Under Ray Train V2 every rank saves into its own temporary directory and reports it
(`ray.train.report(..., checkpoint=Checkpoint.from_directory(d))`); Ray merges the ranks' files
into one persisted checkpoint and hands it back through `ray.train.get_checkpoint()` on restart.
Without Ray, checkpoints go to `<output_dir>/<run name>/checkpoints/step_<n>` on a shared path,
written under a temporary name and renamed once complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_tempnet import comm
from dist_tempnet.config import Config

COMPLETE = "COMPLETE"


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


def write_rank_files(
    directory: Path,
    engine,
    step: int,
    task_state: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, float],
    extra: dict[str, Any],
) -> str:
    """Every rank calls this with its own (or a shared) directory; returns the DeepSpeed tag."""
    tag = f"step_{step:08d}"
    rank, world = comm.rank(), comm.world_size()
    engine.save_checkpoint(str(directory / "deepspeed"), tag=tag, save_latest=True)
    rank_file = directory / f"rank_{rank}.pt"
    buf = tempfile.SpooledTemporaryFile()
    torch.save({"task": task_state, "rng": rng_state(), "step": step, "rank": rank, "world_size": world}, buf)
    buf.seek(0)
    _atomic_write_bytes(rank_file, buf.read())
    if rank == 0:
        meta = {"step": step, "tag": tag, "world_size": world, "config": config, "metrics": metrics, **extra}
        _atomic_write_bytes(directory / "meta.json", json.dumps(meta, indent=1, default=str).encode())
    return tag


def read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / "meta.json"
    if not (directory / COMPLETE).is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint '{directory}' is incomplete (no {COMPLETE} marker or meta.json)")
    return json.loads(meta_path.read_text())


def load_into(directory: Path, engine, task) -> dict[str, Any]:
    """Load a complete checkpoint directory into the engine and the task (all ranks)."""
    meta = read_meta(directory)
    rank = comm.rank()
    load_path, _ = engine.load_checkpoint(
        str(directory / "deepspeed"),
        tag=meta["tag"],
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise FileNotFoundError(
            f"checkpoint '{directory}': DeepSpeed found no state under deepspeed/{meta['tag']}"
        )
    old_world = int(meta["world_size"])
    rank_files = [directory / f"rank_{r}.pt" for r in range(old_world)]
    missing = [str(p) for p in rank_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint '{directory}' lacks rank files {missing}")
    task.load_state(rank_files, old_world)
    own = directory / f"rank_{rank}.pt"
    if old_world == comm.world_size() and own.is_file():
        set_rng_state(torch.load(own, weights_only=False)["rng"])
    return meta | {"path": str(directory)}


class CheckpointSink:
    def save(
        self,
        engine,
        step: int,
        task_state: dict[str, Any],
        config: dict[str, Any],
        metrics: dict[str, float],
        extra: dict[str, Any],
    ) -> str:
        raise NotImplementedError

    def load_latest(self, engine, task) -> dict[str, Any] | None:
        raise NotImplementedError


class LocalSink(CheckpointSink):
    """Checkpoints on a path all ranks share; keeps the newest `keep_last`."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root = root
        self.keep_last = keep_last

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("step_*") if (p / COMPLETE).is_file()]
        return sorted(done, key=lambda p: p.name)

    def save(self, engine, step, task_state, config, metrics, extra) -> str:
        final = self.root / f"step_{step:08d}"
        staging = self.root / f".tmp-step_{step:08d}"
        if comm.rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _barrier()
        write_rank_files(staging, engine, step, task_state, config, metrics, extra)
        _barrier()
        if comm.rank() == 0:
            (staging / COMPLETE).write_text(str(step))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            for old in self.complete_checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return str(final)

    def load_latest(self, engine, task) -> dict[str, Any] | None:
        found = self.complete_checkpoints()
        return load_into(found[-1], engine, task) if found else None


class RaySink(CheckpointSink):
    """Ray Train V2: per-rank temporary directories merged by Ray on report."""

    def save(self, engine, step, task_state, config, metrics, extra) -> str:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="dist-tempnet-ckpt-") as tmp:
            directory = Path(tmp)
            write_rank_files(directory, engine, step, task_state, config, metrics, extra)
            if comm.rank() == 0:
                (directory / COMPLETE).write_text(str(step))
            _barrier()
            ray.train.report(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"step": step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step_{step:08d}",
            )
        storage = ray.train.get_context().get_storage()
        return str(storage.build_checkpoint_path_from_name(f"step_{step:08d}"))

    def load_latest(self, engine, task) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_into(Path(d), engine, task)


def make_sink(cfg: Config, loop_config: dict[str, Any]) -> CheckpointSink:
    if loop_config.get("ray"):
        return RaySink()
    root = Path(
        loop_config.get("checkpoint_root")
        or Path(cfg.run.output_dir).resolve() / cfg.run.name / "checkpoints"
    )
    return LocalSink(root, cfg.checkpoint.keep_last)
