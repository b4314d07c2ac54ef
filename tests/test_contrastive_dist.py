"""Distributed checks of the contrastive losses (gloo, spawned processes) and of DRO state resharding.

The global batch of every step is the same on all ranks (seeded); rank r takes rows r·B..(r+1)·B.
Gradients are averaged over ranks the way DDP / DeepSpeed do, then compared in fp64 with the
single-process reference on the concatenated batch.
"""

from __future__ import annotations

import math
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed
from test_contrastive_math import make_tempnets, reference_dro_step, reference_infonce
from torch import nn

from dist_tempnet import comm
from dist_tempnet.dro_state import DROState, shard_filename
from dist_tempnet.losses.contrastive import CLIPInfoNCELoss, GlobalDROContrastiveLoss, build_contrastive_loss

pytestmark = pytest.mark.multiproc

D_IN, DIM, N_SAMPLES, GLOBAL_BATCH, RHO, LR = 6, 5, 12, 8, 0.6, 0.5
GAMMAS = [0.9, 0.6, 0.4, 0.8, 0.5, 0.7]
TIGHT = {"rtol": 1e-9, "atol": 1e-11}


class Towers(nn.Module):
    """A tiny two-tower "CLIP": linear encoders plus the two TempNets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_encoder = nn.Linear(D_IN, DIM).double()
        self.text_encoder = nn.Linear(D_IN, DIM).double()
        self.image_tempnet, self.text_tempnet = make_tempnets(seed=1, dim=DIM)

    def encode(self, x_image: torch.Tensor, x_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image_encoder(x_image), dim=-1), F.normalize(
            self.text_encoder(x_text), dim=-1
        )


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x_image = torch.randn(GLOBAL_BATCH, D_IN, generator=gen, dtype=torch.float64)
    x_text = torch.randn(GLOBAL_BATCH, D_IN, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, N_SAMPLES, (GLOBAL_BATCH,), generator=gen)  # repeats, even within a batch
    return x_image, x_text, ids


def local_rows(rank: int, world: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    batch = GLOBAL_BATCH // world
    return [t[rank * batch : (rank + 1) * batch] for t in tensors]


def average_grads(module: nn.Module) -> list[torch.Tensor]:
    """What DDP / DeepSpeed do: every parameter gradient averaged over ranks."""
    out = []
    for p in module.parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        out.append(comm.all_reduce_sum(grad) / comm.world_size())
    return out


def sgd(module: nn.Module, grads: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, g in zip(module.parameters(), grads):
            p -= LR * g


def reference_grads(model: Towers, step: int, u_ref: dict) -> list[torch.Tensor]:
    x_image, x_text, ids = global_batch(step)
    model.zero_grad()
    image, text = model.encode(x_image, x_text)
    tau_image, tau_text = model.image_tempnet(image), model.text_tempnet(text)
    loss, _, _ = reference_dro_step(image, text, ids, tau_image, tau_text, u_ref, GAMMAS[step], RHO)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_state_matches(state: DROState, u_ref: dict) -> None:
    for local, sample_id in enumerate(state.global_ids().tolist()):
        assert bool(state.visited[local]) == (sample_id in u_ref), sample_id
        if sample_id in u_ref:
            row = state.table[local]
            u_image, u_text = (row[0] * row[1].exp()).item(), (row[2] * row[3].exp()).item()
            assert (u_image, u_text) == pytest.approx(u_ref[sample_id], rel=1e-10), sample_id


def expected_dro_bytes(world: int) -> int:
    batch, fields = GLOBAL_BATCH // world, 4
    ids, scalars = batch * 8, GLOBAL_BATCH * (fields + 1 + 2) * 8
    features, updated = batch * 2 * DIM * 8, batch * fields * 8
    return ids + scalars + features + updated


def train_and_compare(
    rank: int, world: int, start: int, stop: int, load_dir: str | None, save_dir: str
) -> dict:
    """Steps [start, stop) on `world` ranks, each checked against the single-process reference.

    Steps before `start` are replayed on the reference only; the distributed run then resumes from
    the reference's parameters and from the DRO state shards in `load_dir` (any world size).
    """
    reference, model = Towers(), Towers()
    loss_fn = GlobalDROContrastiveLoss(N_SAMPLES, GAMMAS[0], RHO, model.image_tempnet, model.text_tempnet)
    u_ref: dict[int, tuple[float, float]] = {}
    for step in range(start):
        sgd(reference, reference_grads(reference, step, u_ref))
    if start:
        model.load_state_dict(reference.state_dict())
        loss_fn.dro_state = DROState.from_directory(load_dir, rank, world, num_samples=N_SAMPLES)
        assert_state_matches(loss_fn.dro_state, u_ref)
    for step in range(start, stop):
        x_image, x_text, ids = local_rows(rank, world, *global_batch(step))
        loss_fn.gamma = GAMMAS[step]
        model.zero_grad()
        comm.reset_bytes()
        out = loss_fn(*model.encode(x_image, x_text), ids)
        out.loss.backward()
        assert comm.bytes_sent() == expected_dro_bytes(world)  # and nothing at all in backward
        grads = average_grads(model)
        ref_grads = reference_grads(reference, step, u_ref)
        for (name, _), ours, ref in zip(model.named_parameters(), grads, ref_grads):
            torch.testing.assert_close(
                ours, ref, **TIGHT, msg=lambda m, name=name, step=step: f"{name} @ {step}: {m}"
            )
        sgd(model, grads)
        sgd(reference, ref_grads)
    assert_state_matches(loss_fn.dro_state, u_ref)
    loss_fn.dro_state.save_to_directory(save_dir)
    return {"u_ref": u_ref}


def test_tempnet_dro_gradients_and_state_on_4_then_2_ranks(tmp_path: Path):
    dir4, dir2 = tmp_path / "ws4", tmp_path / "ws2"
    run_distributed(train_and_compare, 4, 0, 3, None, str(dir4))
    assert sorted(p.name for p in dir4.iterdir()) == [shard_filename(r) for r in range(4)]
    results = run_distributed(train_and_compare, 2, 3, 6, str(dir4), str(dir2))  # resumes 4 → 2
    single = DROState.from_directory(dir2, rank=0, world_size=1)  # 2 → 1
    assert single.num_local == N_SAMPLES
    assert_state_matches(single, results[0]["u_ref"])


# ------------------------------------------------------------------------------------------ InfoNCE


def infonce_worker(rank: int, world: int) -> None:
    model, reference = Towers(), Towers()
    loss_fn, ref_loss_fn = CLIPInfoNCELoss(init_tau=0.05).double(), CLIPInfoNCELoss(init_tau=0.05).double()
    ours = [*model.image_encoder.parameters(), *model.text_encoder.parameters(), loss_fn.log_inv_tau]
    refs = [
        *reference.image_encoder.parameters(),
        *reference.text_encoder.parameters(),
        ref_loss_fn.log_inv_tau,
    ]
    for step in range(2):
        x_image, x_text, ids = global_batch(step)
        for p in ours + refs:
            p.grad = None
        out = loss_fn(
            *model.encode(*local_rows(rank, world, x_image, x_text)), local_rows(rank, world, ids)[0]
        )
        out.loss.backward()
        mean_loss = comm.all_reduce_sum(out.loss.detach()) / world
        grads = [comm.all_reduce_sum(p.grad) / world for p in ours]
        ref = reference_infonce(*reference.encode(x_image, x_text), ref_loss_fn.logit_scale())
        ref.backward()
        torch.testing.assert_close(mean_loss, ref.detach(), **TIGHT)
        torch.testing.assert_close(grads, [p.grad for p in refs], **TIGHT)
        with torch.no_grad():
            for p, g, r in zip(ours, grads, refs):
                p -= LR * g
                r -= LR * r.grad


# ------------------------------------------------------------------------------------------ all variants

VARIANTS = {
    "clip": {"init_tau": 0.05},
    "sogclr": {"gamma": 0.8, "init_tau": 0.03, "learnable": True, "rho": 0.4},
    "isogclr": {"gamma": 0.8, "rho": 0.4, "tau_lr": 0.003},
    "isogclr_tempnet": {"gamma": 0.8, "rho": 0.4, "embed_dim": DIM, "num_prototypes": 4},
}


def variant_run(rank: int, world: int, name: str, steps: int = 3) -> dict:
    """Run one loss for a few steps at this world size (also called in-process at world size 1)."""
    torch.manual_seed(0)
    loss_fn = build_contrastive_loss(name, N_SAMPLES, **VARIANTS[name]).double()
    record: dict = {"loss": [], "feature_grads": [], "param_grads": []}
    for step in range(steps):
        x_image, x_text, ids = global_batch(step)
        raw = [x[:, :DIM].clone().requires_grad_() for x in local_rows(rank, world, x_image, x_text)]
        loss_fn.zero_grad()
        out = loss_fn(
            F.normalize(raw[0], dim=-1), F.normalize(raw[1], dim=-1), local_rows(rank, world, ids)[0]
        )
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.image_tau.shape == (GLOBAL_BATCH // world,)
        record["loss"].append(comm.all_reduce_sum(out.loss.detach()) / world)
        # Local feature gradients are K·∂F/∂(local features): gathered and divided by K they are ∇F.
        record["feature_grads"].append([comm.gather_no_grad(r.grad) / world for r in raw])
        record["param_grads"].append(average_grads(loss_fn))
    state = getattr(loss_fn, "dro_state", None)
    record["state"] = (
        None if state is None else (state.global_ids(), state.table.clone(), state.visited.clone())
    )
    return record


def _merged_state(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    table = torch.zeros(N_SAMPLES, records[0]["state"][1].shape[1], dtype=torch.float64)
    visited = torch.zeros(N_SAMPLES, dtype=torch.bool)
    for record in records:
        ids, rows, seen = record["state"]
        table[ids], visited[ids] = rows, seen
    return table, visited


def two_rank_worker(rank: int, world: int) -> dict:
    """One spawn for the 2-rank checks (process start-up dominates their cost)."""
    try:
        infonce_worker(rank, world)
        infonce_error = None
    except AssertionError:
        infonce_error = traceback.format_exc()
    return {
        "infonce_error": infonce_error,
        "variants": {name: variant_run(rank, world, name) for name in VARIANTS},
    }


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_distributed(two_rank_worker, 2)


def test_infonce_on_2_ranks_equals_single_process(two_ranks):
    for rank, result in enumerate(two_ranks):
        assert result["infonce_error"] is None, f"rank {rank}:\n{result['infonce_error']}"


def test_all_variants_on_2_ranks_equal_single_process(two_ranks):
    distributed = [result["variants"] for result in two_ranks]
    for name in VARIANTS:
        single = variant_run(0, 1, name)
        ours = distributed[0][name]
        for key in ("loss", "feature_grads", "param_grads"):
            torch.testing.assert_close(
                ours[key], single[key], **TIGHT, msg=lambda m, name=name, key=key: f"{name}.{key}: {m}"
            )
        if single["state"] is not None:
            table, visited = _merged_state([d[name] for d in distributed])
            assert visited.tolist() == single["state"][2].tolist()
            # Compare u itself: the (u_hat, shift) split of equal u may differ in rounding.
            torch.testing.assert_close(
                table[visited, 0].log() + table[visited, 1],
                single["state"][1][visited, 0].log() + single["state"][1][visited, 1],
                **TIGHT,
            )
            torch.testing.assert_close(table[:, 4:], single["state"][1][:, 4:], **TIGHT)  # iSogCLR τ table


# ------------------------------------------------------------------------------------------ DRO state files


def _random_states(num_samples: int, world: int, extra: dict | None = None) -> list[DROState]:
    gen = torch.Generator().manual_seed(world)
    states = []
    for rank in range(world):
        state = DROState(num_samples, rank, world, extra_fields=extra)
        ids = torch.arange(num_samples)[torch.rand(num_samples, generator=gen) < 0.7]
        state.update(ids, torch.rand(ids.numel(), len(state.fields), generator=gen, dtype=torch.float64))
        states.append(state)
    return states


def _as_global(states: list[DROState]) -> tuple[torch.Tensor, torch.Tensor]:
    n = states[0].num_samples
    table = torch.full((n, len(states[0].fields)), math.nan, dtype=torch.float64)
    visited = torch.zeros(n, dtype=torch.bool)
    for state in states:
        table[state.global_ids()], visited[state.global_ids()] = state.table, state.visited
    return table, visited


@pytest.mark.parametrize("old_world,new_world", [(4, 2), (2, 1), (1, 4), (3, 4)])
def test_reshard_preserves_every_sample(tmp_path: Path, old_world: int, new_world: int):
    old = _random_states(11, old_world, extra={"tau_image": 0.03})
    paths = [state.save_to_directory(tmp_path) for state in old]
    from_files = [DROState.load_resharded(paths[::-1], rank, new_world) for rank in range(new_world)]
    states = [state.state_dict() for state in old]
    from_states = [DROState.from_shard_states(states, rank, new_world) for rank in range(new_world)]
    for new in (from_files, from_states):
        assert [s.num_local for s in new] == [len(range(r, 11, new_world)) for r in range(new_world)]
        assert new[0].fields == old[0].fields
        for got, expected in zip(_as_global(new), _as_global(old)):
            torch.testing.assert_close(got, expected, equal_nan=True)


def test_save_is_atomic_and_load_checks_rank(tmp_path: Path):
    state = _random_states(9, 2)[1]
    path = state.save_to_directory(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    same = DROState(9, 1, 2)
    same.load(path)
    torch.testing.assert_close(same.table, state.table)
    with pytest.raises(ValueError, match=r"rank=1, this rank expects rank=0.*load_resharded"):
        DROState(9, 0, 2).load(path)


def test_reshard_errors_name_the_problem(tmp_path: Path):
    paths = [s.save_to_directory(tmp_path / "a") for s in _random_states(10, 4)]
    with pytest.raises(ValueError, match=r"saved by 4 ranks.*missing ranks \[2\]"):
        DROState.load_resharded([paths[0], paths[1], paths[3]], 0, 2)
    with pytest.raises(ValueError, match=r"saved for num_samples=10, this run has num_samples=12"):
        DROState.load_resharded(paths, 0, 2, num_samples=12)
    other = _random_states(10, 2)[0].save_to_directory(tmp_path / "b")
    with pytest.raises(ValueError, match=rf"{other}: world_size=2 but .* has world_size=4"):
        DROState.load_resharded([paths[0], other], 0, 2)
    with pytest.raises(FileNotFoundError, match="nothing_here.pt"):
        DROState.load_resharded([tmp_path / "nothing_here.pt"], 0, 1)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: not a readable DRO state shard"):
        DROState.load_resharded([garbage], 0, 1)
    with pytest.raises(FileNotFoundError, match="no DRO state shards"):
        DROState.from_directory(tmp_path / "empty_dir", 0, 1)
    states = [s.state_dict() for s in _random_states(10, 4)]
    with pytest.raises(ValueError, match=r"missing ranks \[0\]"):
        DROState.from_shard_states(states[1:], 0, 2)
    with pytest.raises(KeyError, match=r"DRO state dict #0: not a DRO state dict, missing \['u_image'\]"):
        DROState.from_shard_states([{k: v for k, v in states[0].items() if k != "u_image"}], 0, 1)


def test_benchmark_tiny_smoke_run():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "clip_dro_loss.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--tiny"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    header, row = proc.stdout.strip().splitlines()[-2:]
    assert "ratio o/r" in header and row.split()[0] == "2"
