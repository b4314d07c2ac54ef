"""Exact resume arithmetic: data positions of every rank of an earlier run -> where a stream restarts.

:func:`resume_position` turns the states of every rank of an earlier run (any world size, any number
of DataLoader workers) into a :class:`~dist_tempnet.data.streams.StreamResume`: the epoch to restart
at and, per epoch, the ids some rank already consumed. A resumed stream replays the deterministic
epoch order and drops those ids after the shuffle buffer but before decoding, so with the same world
size it yields exactly the batches an uninterrupted run would, and with another world size every
sample of the interrupted epoch is still seen exactly once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from dist_tempnet.data.manifest import Manifest
from dist_tempnet.data.streams import (
    POSITION_FORMAT,
    BatchStream,
    StreamResume,
    epoch_shard_order,
    split_round_robin,
)


def _unpack(bits: np.ndarray, num_samples: int) -> np.ndarray:
    return np.unpackbits(np.asarray(bits, dtype=np.uint8), count=num_samples).astype(bool)


def _check_position(state: dict[str, Any], manifest: Manifest, source: str) -> None:
    if state.get("format") != POSITION_FORMAT:
        raise ValueError(f"{source}: not a data position (expected format {POSITION_FORMAT!r})")
    if list(state["id_range"]) != [manifest.id_start, manifest.id_stop]:
        raise ValueError(
            f"{source}: data position is for sample ids {state['id_range']}, but {manifest.path} holds "
            f"[{manifest.id_start}, {manifest.id_stop}): resuming on another dataset cannot be exact"
        )


def _finished_by(state: dict[str, Any], epoch: int, manifest: Manifest) -> np.ndarray:
    """Ids an old rank consumed in ``epoch``: all of its shards there if it had moved past the
    epoch, else its bitmap (which also holds what its own resume filter had excluded)."""
    if epoch < state["open_epoch"]:
        done = np.zeros(manifest.num_samples, dtype=bool)
        order = epoch_shard_order(manifest.shards, epoch, state["seed"], state["shuffle"])
        for shard in split_round_robin(order, state["rank"], state["world_size"]):
            done[shard.id_start - manifest.id_start : shard.id_stop - manifest.id_start] = True
        return done
    bits = state["consumed"].get(epoch)
    if bits is None:
        return np.zeros(manifest.num_samples, dtype=bool)
    return _unpack(bits, manifest.num_samples)


def resume_position(
    states: Sequence[dict[str, Any]], manifest: Manifest, rank: int, world_size: int, num_workers: int
) -> StreamResume:
    """The stream resume for ``rank`` of ``world_size`` from the position states of EVERY rank of
    an earlier run (``BatchStream.position_state()``, any world size or worker count)."""
    if not states:
        raise ValueError("resume_position needs the data positions of all ranks of the earlier run")
    for i, state in enumerate(states):
        _check_position(state, manifest, f"data position #{i}")
    first = min(s["open_epoch"] for s in states)
    last = max(max(x) for x in ([s["open_epoch"], *s["consumed"]] for s in states))
    consumed: dict[int, np.ndarray] = {}
    for epoch in range(first, last + 1):
        merged = np.zeros(manifest.num_samples, dtype=bool)
        for state in states:
            merged |= _finished_by(state, epoch, manifest)
        consumed[epoch] = merged
    while first in consumed and consumed[first].all():
        del consumed[first]
        first += 1
    old_world = len(states)
    mine = next((s for s in states if s["rank"] == rank), None)
    # The worker rotation only means something for the same ranks with the same workers.
    same_layout = old_world == world_size and mine is not None and mine["num_workers"] == num_workers
    counters = (
        mine
        if same_layout
        else {key: sum(s[key] for s in states) // world_size for key in ("samples_seen", "batches_seen")}
    )
    return StreamResume(
        epoch_start=first,
        consumed=consumed,
        worker_offset=mine["next_worker"] if same_layout else 0,
        samples_seen=counters["samples_seen"],
        batches_seen=counters["batches_seen"],
    )


def data_position(stream: BatchStream | None) -> dict[str, Any] | None:
    """A stream's position for a checkpoint (None before the task built its stream)."""
    return stream.position_state() if stream is not None else None


def resume_data_position(
    task_states: Sequence[dict[str, Any]], manifest: Manifest, rank: int, world_size: int, num_workers: int
) -> StreamResume | None:
    """`resume_position` over the ``data`` entries of every old rank's task state.

    Positions from before exact resume existed (only an epoch) restart at that epoch's beginning,
    with a warning: that epoch's samples already trained on are seen again.
    """
    positions = [state.get("data") for state in task_states]
    if all(p is None for p in positions):
        return None
    if any(p is None or "format" not in p for p in positions):
        epoch = min(int((p or {}).get("epoch", 0)) for p in positions)
        warnings.warn(
            f"checkpoint holds no exact data position: the data stream restarts at epoch {epoch}'s start",
            RuntimeWarning,
            stacklevel=2,
        )
        return StreamResume(epoch_start=epoch, consumed={})
    return resume_position(positions, manifest, rank, world_size, num_workers)
