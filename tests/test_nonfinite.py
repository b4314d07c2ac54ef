"""The non-finite guard skips the whole optimizer step at every ZeRO stage and accumulation: weights,
Adam moments and step counts, and the lr schedule stay bit-identical, and training then continues
and checkpoints. NaN is injected into the first, a middle and the last micro-batch (FaultPlan
`nan_micro`); at world 2 only one rank sees it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dist_tempnet.config import load_config
from dist_tempnet.data import make_demo_clip_dataset
from tests._dist import run_distributed

GLOBAL_BATCH, STEPS_AFTER = 8, 2


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nonfinite") / "clip"
    return make_demo_clip_dataset(root, num_train=64, num_eval=8, image_size=16, samples_per_shard=16, seed=0)


def _state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights; every tensor of the (inner torch) optimizer: its parameters (under ZeRO the
    fp32 master partitions), Adam moments and step counts; the lr schedule."""
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)  # the torch AdamW inside DeepSpeed's ZeRO wrapper
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[f"w/{name}"] = (p.detach() if full is None else full).clone()
    for i, (p, state) in enumerate(base.state.items()):
        out[f"master/{i}"] = p.detach().clone()
        for key, value in state.items():
            out[f"opt/{i}/{key}"] = torch.as_tensor(value).clone()
    assert any(k.endswith("exp_avg") for k in out), "Adam state exists"
    out["lr"] = torch.tensor([g["lr"] for g in base.param_groups], dtype=torch.float64)
    out["scheduler"] = torch.tensor(engine.lr_scheduler.state_dict()["last_epoch"])
    return out


def _nan_worker(rank: int, world: int, data: str, root: str, setups: list, nan_rank: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from dist_tempnet.runtime.checkpoint import LocalSink, latest_checkpoint
    from dist_tempnet.runtime.faults import FaultPlan
    from dist_tempnet.runtime.trainer import Trainer

    results = {}
    for stage, accum, micros in setups:
        steps = 1 + len(micros) + STEPS_AFTER
        micro_batch = GLOBAL_BATCH // world // accum
        overrides = [
            f"data.path={data}", "data.demo=false", "data.image_size=16", "data.shuffle_buffer=16",
            "loss.name=isogclr_tempnet", f"deepspeed.zero_stage={stage}", f"ray.num_workers={world}",
            f"train.global_batch_size={GLOBAL_BATCH}", f"train.micro_batch_size={micro_batch}",
            f"train.steps={steps}", "train.warmup_steps=1", "train.log_every=1", "checkpoint.every=0",
            "eval.max_batches=1", "eval.zero_shot=false", "mlflow.enabled=false", "run.seed=0",
        ]  # fmt: skip
        cfg = load_config(None, overrides)
        ckpt_root = Path(root) / f"z{stage}-a{accum}"
        trainer = Trainer(cfg, None, LocalSink(ckpt_root, 2))
        assert trainer.engine.gradient_accumulation_steps() == accum
        trainer.train_step()  # one clean step: Adam state exists
        trainer.step = 1
        out: dict = {"changed": {}, "skipped": []}
        for micro in micros:
            before = _state(trainer.engine)
            if rank == nan_rank:
                trainer.fault = FaultPlan(nan_step=trainer.step + 1, nan_micro=micro)
            out["skipped"].append(trainer.train_step() is None)
            trainer.step += 1
            after = _state(trainer.engine)
            out["changed"][micro] = [k for k in before if not torch.equal(before[k], after[k])]
        trainer.fault = FaultPlan()
        before = _state(trainer.engine)
        final = trainer.fit()  # the remaining clean steps, then the final checkpoint
        after = _state(trainer.engine)
        out["trained_after"] = any(not torch.equal(before[k], after[k]) for k in before if k.startswith("w/"))
        out["finite_after"] = all(torch.isfinite(v).all() for v in after.values())
        out["final_loss"] = final["batch/loss"]
        out["counters"] = (trainer.engine.global_steps, trainer.engine.skipped_steps, trainer.step)
        latest = latest_checkpoint(ckpt_root)
        out["checkpoint"] = latest.name if latest else None
        results[(stage, accum)] = out
    return results


def _check(results: dict, setups: list) -> None:
    for stage, accum, micros in setups:
        out = results[(stage, accum)]
        case = f"ZeRO-{stage}, accumulation {accum}"
        assert out["skipped"] == [True] * len(micros), case
        for micro, changed in out["changed"].items():
            assert changed == [], f"{case}, NaN in micro-batch {micro}: the skip changed {changed[:5]}"
        assert out["trained_after"] and out["finite_after"], f"{case}: training does not continue cleanly"
        assert torch.isfinite(torch.tensor(out["final_loss"])), case
        steps = 1 + len(micros) + STEPS_AFTER
        assert out["counters"] == (steps, len(micros), steps), f"{case}: DeepSpeed counters {out['counters']}"
        assert out["checkpoint"] == f"step_{steps:08d}", case


@pytest.mark.multiproc
def test_nonfinite_step_skipped_at_every_zero_stage_and_accumulation(clip_data, tmp_path):
    setups = [(stage, accum, [0] if accum == 1 else [0, 2, 3]) for stage in (0, 1, 2, 3) for accum in (1, 4)]
    (results,) = run_distributed(_nan_worker, 1, str(clip_data), str(tmp_path), setups, 0, timeout=600)
    _check(results, setups)


@pytest.mark.multiproc
def test_nonfinite_on_one_rank_skips_the_step_on_all(clip_data, tmp_path, capsys):
    setups = [(2, 2, [1])]  # NaN in rank 1's last micro-batch only
    results = run_distributed(_nan_worker, 2, str(clip_data), str(tmp_path), setups, 1, timeout=300)
    for r in results:
        _check(r, setups)
    # `export` takes the run directory, as `eval` does (its newest complete checkpoint), and names a
    # path that does not exist as such.
    from dist_tempnet.commands.cli import main

    assert main(["export", "--checkpoint", str(tmp_path / "z2-a2"), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "tempnet.safetensors").is_file()
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "incomplete" not in err, err
