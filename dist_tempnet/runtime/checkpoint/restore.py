"""Loading a checkpoint into a running engine and task, at the same or another world size.

ZeRO-1/2 optimizer state is saved in DeepSpeed's "elastic" layout (runtime.engine turns it on), which
is re-partitioned here when a run resumes on another number of workers; the task re-shards its DRO
state and remaps its data position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dist_tempnet import comm
from dist_tempnet.runtime.checkpoint.layout import (
    load_trusted,
    read_meta,
    set_rng_state,
    verify_checkpoint,
    weights_only_loads,
)


def read_task_states(rank_files: list[Path]) -> list[dict[str, Any]]:
    """The `task` part of every old rank's file, in rank order (memory-mapped: every new rank reads
    all old shards but keeps only the rows it owns)."""
    return [load_trusted(p, mmap=True)["task"] for p in rank_files]


def _load_engine(directory: Path, meta: dict[str, Any], engine) -> None:
    old_world, world = int(meta["world_size"]), comm.world_size()
    stage = int(meta["config"]["deepspeed"]["zero_stage"])
    if old_world != world and stage == 3:
        raise RuntimeError(
            f"checkpoint '{directory}' was saved by {old_world} ZeRO-3 workers and this run has {world}: "
            "DeepSpeed 0.19.8 cannot re-partition ZeRO-3 state on load. Resume with "
            f"ray.num_workers={old_world}, or convert the checkpoint with DeepSpeed's ds_to_universal."
        )
    zero_1_2 = stage in (1, 2)
    # DeepSpeed 0.19.8's engine refuses ZeRO optimizer state saved at another data-parallel size and
    # its elastic-layout loader asserts a param-group "step" that torch's AdamW does not keep. So for
    # ZeRO-1/2 the engine loads module, scheduler and counters, and `_load_zero_1_2_state` the
    # optimizer state (re-partitioned with DeepSpeed's own routines; exact at any world size).
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(
            str(directory / "deepspeed"),
            tag=meta["tag"],
            load_optimizer_states=not zero_1_2,
            load_lr_scheduler_states=True,
        )
    if load_path is None:
        raise FileNotFoundError(
            f"checkpoint '{directory}': DeepSpeed found no state under deepspeed/{meta['tag']}"
        )
    if zero_1_2:
        _load_zero_1_2_state(engine, directory / "deepspeed" / meta["tag"], old_world)


def _load_zero_1_2_state(engine, tag_dir: Path, old_world: int) -> None:
    """Load ZeRO-1/2 fp32 master weights and Adam moments saved by `old_world` ranks into this
    run's partitions (pinned DeepSpeed 0.19.8 internals)."""
    names = [tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(old_world)]
    states = [load_trusted(n)["optimizer_state_dict"] for n in names]
    optimizer = engine.optimizer
    if isinstance(states[0]["base_optimizer_state"], dict):  # saved without the elastic layout
        if old_world != comm.world_size():
            raise RuntimeError(
                f"{tag_dir}: optimizer state was saved without DeepSpeed's elastic_checkpoint layout, so "
                f"it cannot be re-partitioned; resume with ray.num_workers={old_world}"
            )
        optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        return
    optimizer._load_global_state(states[0])
    _restore_adam_partitions(optimizer, states)
    optimizer._restore_from_elastic_fp32_weights(states)
    optimizer._link_all_hp_params()
    # The base optimizer's param groups (with their current lr) were not loaded: take the lr the
    # restored scheduler computed last, or the first step after a resume would use the initial one.
    if engine.lr_scheduler is not None:
        for group, lr in zip(optimizer.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr


def _restore_adam_partitions(optimizer, states: list[dict[str, Any]]) -> None:
    # DeepSpeed's _restore_elastic_base_optimizer_state does this too, but asserts a param-group
    # "step" that torch's Adam keeps per parameter state instead.
    for i, group in enumerate(optimizer.optimizer.param_groups):
        flat = group["params"][0]
        saved = [sd["base_optimizer_state"][i] for sd in states]
        for key in saved[0]:
            values = [s[key] for s in saved]
            per_rank = all(
                torch.is_tensor(v) and v.shape == sd["single_partition_of_fp32_groups"][i].shape
                for v, sd in zip(values, states)
            )
            value = optimizer._partition_base_optimizer_state(key, values, i, is_partition_state=per_rank)
            if torch.is_tensor(value):
                value = value.detach().clone().to(flat.device if per_rank else value.device)
            optimizer.optimizer.state[flat][key] = value


def load_into(directory: Path, engine, task) -> dict[str, Any]:
    """Load a complete checkpoint directory into the engine and the task (all ranks).

    With another world size than the checkpoint's, DeepSpeed re-partitions the (elastic) ZeRO-1/2
    optimizer state, the task re-shards its DRO state and remaps its data position; RNG states are
    restored only for the same world size (they are per rank).
    """
    directory = Path(directory)
    verify_checkpoint(directory)  # complete, and every file's SHA-256 as saved: before any load
    meta = read_meta(directory)
    _load_engine(directory, meta, engine)
    old_world = int(meta["world_size"])
    rank_files = [directory / f"rank_{r}.pt" for r in range(old_world)]
    task.load_state(read_task_states(rank_files), old_world)
    own = directory / f"rank_{comm.rank()}.pt"
    if old_world == comm.world_size():
        set_rng_state(load_trusted(own)["rng"])
    return meta | {"path": str(directory)}
