"""configs/llama2_7b_chat_tempnet_only.yaml end to end on a tiny chat-model stand-in (CPU, DeepSpeed).

The paper's LLaMA-2-chat setting: chat data rendered with the model's chat template, the loss on
assistant tokens only, the LLM frozen (bit-identical after training) and only TempNet learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_tempnet.config import load_config
from tests._dist import run_distributed
from tests._tiny_hf import save_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def chat_overrides(model: str, data: str, out: str) -> list[str]:
    """Shrink the 7B config to the stand-in; everything else (mode, loss, ρ, τ range, ZeRO-2, bf16) as is."""
    return [
        f"model.pretrained={model}",
        f"data.path={data}",
        "data.seq_len=32",
        f"run.output_dir={out}",
        "ray.num_workers=1",
        "ray.use_gpu=auto",
        "ray.cpus_per_worker=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        f"train.steps={STEPS}",
        "train.warmup_steps=0",
        "loss.tempnet_lr=1.0e-2",  # the config's 1e-5 is for 5000 steps; a few steps need more
        "loss.chunk_size=64",
        "mlflow.enabled=false",
    ]


def _chat_worker(rank: int, world: int, model: str, data: str, tmp: str):
    from dist_tempnet.data import eval_batches
    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.trainer import Trainer
    from dist_tempnet.tasks.lm import inputs_and_labels

    cfg = load_config(REPO / "configs" / "llama2_7b_chat_tempnet_only.yaml", chat_overrides(model, data, tmp))
    assert cfg.train.mode == "tempnet_only" and cfg.train.precision == "bf16" and cfg.loss.name == "tempnet"
    trainer = Trainer(cfg, None, LocalSink(Path(tmp) / "ckpt", keep_last=1))
    module = trainer.engine.module
    lm_before = {k: v.detach().clone() for k, v in module.lm.state_dict().items()}
    tempnet_before = {k: v.detach().clone() for k, v in module.tempnet.state_dict().items()}
    fixed = next(iter(eval_batches(data, "train", batch_size=4)))
    inputs, labels = inputs_and_labels(fixed)

    def fixed_loss() -> float:
        module.eval()
        with torch.no_grad():
            loss, _ = module(inputs, labels, None)
        module.train()
        return float(loss)

    loss_before = fixed_loss()
    step_losses = []
    for _ in range(STEPS):
        metrics = trainer.train_step()
        assert metrics is not None
        step_losses.append(metrics["batch/loss"])
    return {
        "lm_dtype": str(next(module.lm.parameters()).dtype),
        "lm_identical": all(torch.equal(lm_before[k], v) for k, v in module.lm.state_dict().items()),
        "tempnet_changed": any(
            not torch.equal(tempnet_before[k], v) for k, v in module.tempnet.state_dict().items()
        ),
        "loss_before": loss_before,
        "loss_after": fixed_loss(),
        "step_losses": step_losses,
        "masked_out": int((labels == -100).sum()),
        "targets": int((labels != -100).sum()),
    }


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    from dist_tempnet.data import make_chat_shards

    root = tmp_path_factory.mktemp("chat")
    model = save_tiny_chat_model(root / "tiny-llama-chat")
    rows = [
        {
            "messages": [
                {"role": "system", "content": "you are a helpful model"},
                {"role": "user", "content": f"what is the capital of france {i}"},
                {"role": "assistant", "content": "paris" if i % 2 else "the capital of france is paris"},
            ]
        }
        for i in range(64)
    ]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = make_chat_shards([root / "chat.jsonl"], model, root / "chat_sft", 32, samples_per_shard=16)
    return root, model, data


@pytest.mark.multiproc
def test_llama2_chat_tempnet_only_config_runs_on_a_tiny_stand_in(chat_setup, tmp_path):
    _, model, data = chat_setup
    (out,) = run_distributed(_chat_worker, 1, str(model), str(data), str(tmp_path), timeout=600)
    assert out["lm_dtype"] == "torch.bfloat16"  # loaded in the training dtype
    assert out["lm_identical"], "the frozen LLM changed"
    assert out["tempnet_changed"], "TempNet did not train"
    assert out["masked_out"] > 0 and out["targets"] > 0  # prompt tokens are not targets
    assert out["loss_after"] < out["loss_before"], out
    assert out["step_losses"][-1] < out["step_losses"][0], out["step_losses"]
