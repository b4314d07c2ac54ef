"""Checkpoints: DeepSpeed engine state + one file per rank (task state, RNG) + metadata.

`layout` (what a checkpoint holds, writing, completeness), `restore` (loading at any world size),
`sinks` (local directory or Ray Train storage).
"""

from dist_tempnet.runtime.checkpoint.layout import (
    COMPLETE,
    META,
    checkpoint_bytes,
    complete_checkpoints,
    is_complete,
    latest_checkpoint,
    load_trusted,
    missing_parts,
    read_meta,
    retained_checkpoints,
    rng_state,
    set_rng_state,
    verify_checkpoint,
    weights_only_loads,
    write_rank_files,
)
from dist_tempnet.runtime.checkpoint.restore import (
    ResumePoint,
    align_optimizer_state,
    checked_meta,
    load_into,
    needs_universal,
    read_task_states,
    universal_copy,
)
from dist_tempnet.runtime.checkpoint.sinks import CheckpointSink, LocalSink, RaySink, make_sink

__all__ = [
    "COMPLETE",
    "META",
    "CheckpointSink",
    "LocalSink",
    "RaySink",
    "ResumePoint",
    "align_optimizer_state",
    "checked_meta",
    "needs_universal",
    "universal_copy",
    "checkpoint_bytes",
    "complete_checkpoints",
    "is_complete",
    "latest_checkpoint",
    "load_into",
    "load_trusted",
    "make_sink",
    "missing_parts",
    "read_meta",
    "read_task_states",
    "retained_checkpoints",
    "rng_state",
    "set_rng_state",
    "verify_checkpoint",
    "weights_only_loads",
    "write_rank_files",
]
