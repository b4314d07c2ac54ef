"""What a finished run ended with, for comparing a resumed run with an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import torch


def final_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(consolidated fp32 module weights incl. TempNets, full DRO table) of a checkpoint."""
    from dist_tempnet.dro_state import DROState
    from dist_tempnet.runtime.checkpoint import read_meta, read_task_states
    from dist_tempnet.runtime.export import consolidated_state_dict

    world = read_meta(checkpoint)["world_size"]
    states = read_task_states([checkpoint / f"rank_{r}.pt" for r in range(world)])
    dro = DROState.from_shard_states([s["dro_state"] for s in states], 0, 1)
    table = {name: dro.field(name) for name in dro.fields} | {"visited": dro.visited}
    return consolidated_state_dict(checkpoint), table


def assert_same_final_state(reference: Path, other: Path) -> None:
    """Weights, TempNets and DRO state of `other` are bit-identical to `reference`'s."""
    ref_weights, ref_dro = final_state(reference)
    weights, dro = final_state(other)
    assert ref_weights.keys() == weights.keys() and any("tempnet" in k for k in weights)
    # Deterministic CPU runs: the tolerance is exact equality.
    for name, value in ref_weights.items():
        assert torch.equal(value, weights[name]), f"{name} differs from the uninterrupted run"
    for name, value in ref_dro.items():
        assert torch.equal(value, dro[name]), f"DRO state {name} differs from the uninterrupted run"
