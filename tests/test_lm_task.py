"""The LM task inside real DeepSpeed engines (gloo, 1–2 processes): modes, ZeRO-3, data parallel loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_tempnet.config import load_config
from tests._dist import run_distributed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    from dist_tempnet.data import make_demo_text_dataset

    out = tmp_path_factory.mktemp("lmdata") / "demo_text"
    make_demo_text_dataset(out, seq_len=32, seed=0)
    return out


def _trainer(cfg, tmp: str):
    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.trainer import Trainer

    return Trainer(cfg, None, LocalSink(Path(tmp) / "ckpt", keep_last=1))


def _tempnet_only_worker(rank: int, world: int, data: str, tmp: str, stage: int):
    cfg = load_config(
        REPO / "configs" / "lm_tiny_tempnet_only.yaml",
        [
            f"data.path={data}",
            "data.seq_len=32",
            f"ray.num_workers={world}",
            "train.global_batch_size=4",
            "train.micro_batch_size=2",
            "train.steps=3",
            f"deepspeed.zero_stage={stage}",
            "mlflow.enabled=false",
        ],
    )
    trainer = _trainer(cfg, tmp)
    module = trainer.engine.module
    before = {k: v.detach().clone() for k, v in module.lm.state_dict().items()}
    tempnet_before = {k: v.detach().clone() for k, v in module.tempnet.state_dict().items()}
    for _ in range(3):
        assert trainer.train_step() is not None
    lm_ids = {id(p) for p in module.lm.parameters()}
    optimized = [p for group in trainer.engine.optimizer.bit16_groups for p in group]
    assert optimized and not any(id(p) in lm_ids for p in optimized), "LM params must have no optimizer state"
    assert all(p.grad is None and not p.requires_grad for p in module.lm.parameters())
    same = all(torch.equal(before[k], v) for k, v in module.lm.state_dict().items())
    tempnet_changed = any(
        not torch.equal(tempnet_before[k], v) for k, v in module.tempnet.state_dict().items()
    )
    return same, tempnet_changed


@pytest.mark.multiproc
def test_tempnet_only_freezes_lm(text_data, tmp_path):
    results = run_distributed(_tempnet_only_worker, 2, str(text_data), str(tmp_path), 2, timeout=300)
    assert all(same for same, _ in results), "frozen LM weights changed"
    assert all(changed for _, changed in results), "TempNet did not train"


def _grad_worker(rank: int, world: int, data: str, tmp: str, stage: int, loss: str):
    """One micro step on this rank's half of a fixed global batch; returns TempNet/LM grads after
    DeepSpeed's averaging (read back as full tensors)."""
    cfg = load_config(
        REPO / "configs" / "lm_tiny_scratch.yaml",
        [
            f"data.path={data}",
            "data.seq_len=32",
            f"ray.num_workers={world}",
            "train.global_batch_size=4",
            f"train.micro_batch_size={4 // world}",
            "train.steps=1",
            f"deepspeed.zero_stage={stage}",
            "mlflow.enabled=false",
            f"loss.name={loss}",
            "loss.tempnet_dropout=0.0",
            "train.lr=1e-2",
            "loss.tempnet_lr=1e-2",
            "train.warmup_steps=0",
            "train.lr_schedule=constant",
            "train.grad_clip=0",
            "train.weight_decay=0",
        ],
    )
    torch.manual_seed(0)
    trainer = _trainer(cfg, tmp)
    torch.manual_seed(1)
    ids = torch.randint(0, 200, (4, 33))
    ids[0, 5:20] = -100  # ignored labels make the ranks' valid-token counts differ
    per_rank = 4 // world
    mine = ids[per_rank * rank : per_rank * (rank + 1)]
    batch = {"input_ids": mine.clamp_min(0), "sample_ids": torch.arange(per_rank), "loss_mask": mine >= 0}
    result = trainer.task.forward(trainer.engine, batch)
    trainer.engine.backward(result.loss)
    from deepspeed.utils import safe_get_full_grad

    # Gradients as the optimizer will see them (after DeepSpeed's averaging over ranks).
    return {n: safe_get_full_grad(p).detach().clone() for n, p in trainer.engine.module.named_parameters()}


def _grad_worker_per_stage(rank: int, world: int, data: str, tmp: str, stages: tuple[int, ...], loss: str):
    """`_grad_worker` once per ZeRO stage, in the same processes (spawning and importing DeepSpeed
    costs more than the steps)."""
    return {stage: _grad_worker(rank, world, data, f"{tmp}/zero{stage}", stage, loss) for stage in stages}


@pytest.mark.multiproc
def test_data_parallel_step_equals_single_process(text_data, tmp_path):
    """Two ranks with uneven valid-token counts get, after DeepSpeed's averaging, the gradient one
    rank computes on the concatenated batch (the global token mean), TempNet included; ZeRO-2 and 3."""
    stages = (2, 3)
    args = (stages, "tempnet")
    two = run_distributed(_grad_worker_per_stage, 2, str(text_data), str(tmp_path / "a"), *args, timeout=300)
    one = run_distributed(_grad_worker_per_stage, 1, str(text_data), str(tmp_path / "b"), *args, timeout=300)
    for stage in stages:
        for name, value in one[0][stage].items():
            for rank in (0, 1):
                torch.testing.assert_close(
                    two[rank][stage][name],
                    value,
                    rtol=2e-4,
                    atol=2e-6,
                    msg=f"ZeRO-{stage} rank {rank}: {name}",
                )


def _tau_metrics_worker(rank: int, world: int, data: str, tmp: str):
    cfg = load_config(
        REPO / "configs" / "lm_tiny_scratch.yaml",
        [
            f"data.path={data}",
            "data.seq_len=32",
            "ray.num_workers=1",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "train.steps=2",
            "train.log_every=1",
            "deepspeed.zero_stage=2",
            "eval.max_batches=2",
            "mlflow.enabled=false",
        ],
    )
    trainer = _trainer(cfg, tmp)
    return trainer.fit()


@pytest.mark.multiproc
def test_tau_spread_and_correlations_are_logged(text_data, tmp_path):
    """Per-step τ spread and bound shares; held-out τ against predictive entropy and token frequency."""
    final = run_distributed(_tau_metrics_worker, 1, str(text_data), str(tmp_path), timeout=300)[0]
    for key in ("tau/p10", "tau/p50", "tau/p90", "tau/at_min", "tau/at_max", "eval/tau_p50"):
        assert key in final, key
    assert final["tau/p10"] <= final["tau/p50"] <= final["tau/p90"]
    for key in ("eval/tau_entropy_spearman", "eval/tau_freq_spearman"):
        assert -1.0 <= final[key] <= 1.0, key


def test_loss_compile_setting_reaches_the_fused_loss(text_data, monkeypatch):
    """loss.compile (auto | true | false; YAML booleans too) picks the fused loss's chunk kernel."""
    from dist_tempnet.config import ConfigError
    from dist_tempnet.losses import lm as lm_loss
    from dist_tempnet.tasks.lm import LMTask

    def config(value: str):
        overrides = [f"data.path={text_data}", "data.seq_len=32", "loss.tempnet_hidden=16", value]
        return load_config(REPO / "configs" / "lm_tiny_scratch.yaml", overrides)

    assert config("loss.chunk_size=1024").loss.compile == "auto"
    assert config("loss.compile=false").loss.compile == "false"  # a YAML boolean
    with pytest.raises(ConfigError, match="loss.compile"):
        config("loss.compile=sometimes")
    assert LMTask(config("loss.compile=auto"), 0, 1, torch.device("cpu")).module.compiled is None
    task = LMTask(config("loss.compile=true"), 0, 1, torch.device("cpu"))
    assert task.module.compiled is True
    calls = []

    def kernel(*args):  # the kernel's code, uncompiled: this test checks the wiring, not inductor
        calls.append(args[0].shape)
        return lm_loss._chunk_kernel(*args)

    monkeypatch.setattr(lm_loss, "_compiled_chunk_kernel", lambda: kernel)
    ids = torch.randint(0, 100, (2, 17))
    loss, _ = task.module(ids[:, :-1], ids[:, 1:], None)
    loss.backward()
    assert calls and torch.isfinite(loss)


def test_token_batches_are_pinned_for_cuda(text_data):
    from dist_tempnet.tasks.lm import LMTask

    cfg = load_config(
        REPO / "configs" / "lm_tiny_scratch.yaml",
        [f"data.path={text_data}", "data.seq_len=32", "loss.tempnet_hidden=16", "data.num_workers=1"],
    )
    assert LMTask(cfg, 0, 1, torch.device("cuda", 0))._open_stream(None).loader_kwargs()["pin_memory"]
    assert not LMTask(cfg, 0, 1, torch.device("cpu"))._open_stream(None).loader_kwargs()["pin_memory"]
