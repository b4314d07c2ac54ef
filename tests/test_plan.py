"""`dist-tempnet plan`: parameter counts against real models, memory against DeepSpeed's estimators
and against a measured tiny DeepSpeed run, communication formulas, infeasible configs rejected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_tempnet.commands.cli import main
from dist_tempnet.config import load_config
from dist_tempnet.driver import plan as planner

REPO = Path(__file__).resolve().parents[1]
LLM_ZERO3 = REPO / "configs" / "llm_1b_zero3.yaml"
# Nothing lives here, so no dataset tokenizer is picked up from the working directory.
NO_DATA = "data.path=/nonexistent/dist_tempnet_plan_test"


def meta_count(factory) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in factory().parameters())


def test_llama2_7b_parameter_count_is_exact():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_config(None, ["run.task=lm", "model.preset=llama2_7b", "loss.name=ce", NO_DATA])
    shape = planner.model_shape(cfg)
    reference = meta_count(
        lambda: LlamaForCausalLM(
            LlamaConfig(
                hidden_size=4096,
                num_hidden_layers=32,
                num_attention_heads=32,
                intermediate_size=11008,
                vocab_size=32000,
                tie_word_embeddings=False,
            )
        )
    )
    assert shape.backbone_params == reference == 6_738_415_616
    assert "meta device" in shape.description
    assert shape.largest_layer_params == 32000 * 4096  # embedding / head


def test_clip_vit_b32_parameter_count_is_exact():
    from transformers import CLIPConfig, CLIPModel

    cfg = load_config(
        None, ["model.preset=clip_vit_b32", "data.image_size=224", "data.max_text_len=77", NO_DATA]
    )
    shape = planner.model_shape(cfg, vocab_size=49408)
    reference = meta_count(
        lambda: CLIPModel(
            CLIPConfig(
                projection_dim=512,
                vision_config=dict(
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    patch_size=32,
                    image_size=224,
                ),
                text_config=dict(
                    hidden_size=512,
                    intermediate_size=2048,
                    num_hidden_layers=12,
                    num_attention_heads=8,
                    max_position_embeddings=77,
                    vocab_size=49408,
                ),
            )
        )
    )
    assert shape.backbone_params == reference == 151_277_313
    assert [t.tokens_per_sample for t in shape.towers] == [50, 77]


def test_tiny_models_are_built_and_counted_like_the_trainer_builds_them():
    from dist_tempnet.models.clip import build_clip_model
    from dist_tempnet.models.lm import build_causal_lm
    from dist_tempnet.tempnet import LMTempNet

    cfg = load_config(None, [NO_DATA])
    shape = planner.model_shape(cfg, vocab_size=300)
    real = build_clip_model("clip_tiny", vocab_size=300, image_size=32, max_text_len=16)
    assert "built" in shape.description
    assert shape.backbone_params == sum(p.numel() for p in real.parameters())

    cfg = load_config(
        None,
        ["run.task=lm", "model.preset=llama_tiny", "loss.name=tempnet", "train.mode=tempnet_only", NO_DATA],
    )
    shape = planner.model_shape(cfg, vocab_size=500)
    lm = build_causal_lm("llama_tiny", vocab_size=500)
    assert shape.frozen_params == sum(p.numel() for p in lm.parameters())
    assert (
        shape.trainable_params == shape.tempnet_params == sum(p.numel() for p in LMTempNet(500).parameters())
    )


def synthetic_shape(params: int, largest: int) -> planner.ModelShape:
    return planner.ModelShape("lm", "synthetic", params, 0, params, 0, largest, towers=[])


@pytest.mark.parametrize("params,largest", [(1_345_423_360, 65_536_000), (6_738_415_616, 131_072_000)])
@pytest.mark.parametrize("gpus", [8, 16, 64])
def test_model_states_agree_with_deepspeed_estimators(params, largest, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = synthetic_shape(params, largest)
    states = {"parameters", "Adam", "fp32 master", "gradients", "fp32 gradients"}

    def ours(stage: int) -> float:
        items = planner.model_state_items(shape, stage, "bf16", gpus, "cuda")
        total = sum(i.bytes for i in items if i.name.startswith(tuple(states)))
        if stage == 3:
            total += sum(i.bytes for i in items if i.name.startswith("ZeRO-3 gathered"))
        return total

    _, ds2 = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=False)
    assert ours(2) == pytest.approx(ds2, rel=1e-6)  # 2Ψ + 18Ψ/K, the same accounting
    _, ds3, _ = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=gpus, cpu_offload=False, cpu_offload_params=False
    )
    # Ours also counts the 16-bit parameter shards (2Ψ/K) DeepSpeed's stage-3 formula leaves out.
    assert ours(3) == pytest.approx(ds3 + 2 * params / gpus, rel=1e-6)
    assert ours(3) / ds3 < 1.12


def _saved_activation_bytes(model: torch.nn.Module, forward) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves during `forward`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


def _per_layer_saved_bytes(build, forward) -> float:
    """Saved bytes of one block: the difference between a 3-layer and a 1-layer model, halved."""
    torch.manual_seed(0)
    counts = []
    for layers in (1, 3):
        model = build(layers)
        counts.append(_saved_activation_bytes(model, lambda m=model: forward(m)))
    return (counts[1] - counts[0]) / 2


def test_activation_formulas_match_saved_tensors():
    from transformers import CLIPTextConfig, CLIPTextModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    batch, seq = 4, 32
    ids = torch.randint(0, 100, (batch, seq))
    cases = [
        (
            "clip",
            lambda n: CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=128,
                    intermediate_size=512,
                    num_hidden_layers=n,
                    num_attention_heads=4,
                    vocab_size=100,
                    max_position_embeddings=seq,
                )
            ),
            planner.Tower("t", "clip", 1, 128, 128, 512, seq),
        ),
        (
            "llama",
            lambda n: LlamaModel(
                LlamaConfig(
                    hidden_size=128,
                    intermediate_size=344,
                    num_hidden_layers=n,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    vocab_size=100,
                )
            ),
        ),
        (
            "gpt2",
            lambda n: GPT2Model(GPT2Config(n_embd=128, n_layer=n, n_head=4, vocab_size=100, n_positions=seq)),
        ),
    ]
    towers = {
        "llama": planner.Tower("t", "llama", 1, 128, 64, 344, seq),
        "gpt2": planner.Tower("t", "gpt2", 1, 128, 128, 512, seq),
    }
    for case in cases:
        style, build = case[0], case[1]
        tower = case[2] if len(case) > 2 else towers[style]

        def build_sdpa(n, build=build):
            model = build(n)
            model.config._attn_implementation = "sdpa"
            return model.train()

        measured = _per_layer_saved_bytes(build_sdpa, lambda m: m(input_ids=ids))
        predicted = planner.block_bytes_per_token(tower, 4) * batch * seq
        assert predicted == pytest.approx(measured, rel=0.05), style


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offloaded_optimizer_state_counts_on_the_host(stage, capsys):
    """deepspeed.offload_optimizer (ZeRO-Offload): fp32 master weights, Adam moments and the fp32
    gradient partition of the step live in host memory, not on the GPU."""
    p, k = 1_000_000_000, 8
    shape = synthetic_shape(p, 50_000_000)
    on = planner.model_state_items(shape, stage, "bf16", k, "cuda", offload_optimizer=True)
    off = planner.model_state_items(shape, stage, "bf16", k, "cuda")

    def total(items, where):
        return sum(i.bytes for i in items if i.where == where)

    host = {i.name.split(" (")[0]: i.bytes for i in on if i.where == "host"}
    assert host["Adam moments"] == 8 * p / k and host["fp32 master weights"] == 4 * p / k
    assert not any(i.name.startswith(("Adam", "fp32 master")) for i in on if i.where == "gpu")
    assert total(off, "gpu") - total(on, "gpu") >= 12 * p / k
    assert total(on, "gpu") + total(on, "host") >= total(off, "gpu"), "moved, not dropped"

    # Training refuses ZeRO-Offload (no CPU Adam build here), so `plan` does not plan it silently.
    overrides = [f"deepspeed.zero_stage={stage}", "deepspeed.offload_optimizer=true"]
    rc = main(["plan", "--config", str(LLM_ZERO3), "--gpus", "8", "--gpu-mem", "80", *overrides])
    assert rc == 2 and "deepspeed.offload_optimizer" in capsys.readouterr().err


def test_infeasible_config_is_rejected_with_the_reason(capsys):
    cfg = load_config(str(LLM_ZERO3), ["deepspeed.zero_stage=0", "train.activation_checkpointing=false"])
    plan = planner.make_plan(cfg, 8, 24)
    assert not plan.feasible
    (reason,) = plan.reasons
    assert "per GPU" in reason and "24 GiB" in reason and "deepspeed.zero_stage=3" in reason

    rc = main(
        ["plan", "--config", str(LLM_ZERO3), "--gpus", "8", "--gpu-mem", "24", "deepspeed.zero_stage=0"]
    )
    out = capsys.readouterr().out
    assert rc == 1 and "INFEASIBLE" in out

    rc = main(["plan", "--config", str(LLM_ZERO3), "--gpus", "3"])
    out = capsys.readouterr().out
    assert rc == 1 and "not divisible by 3 GPUs" in out


def test_feasible_plan_prints_memory_and_communication(capsys):
    rc = main(["plan", "--config", str(LLM_ZERO3), "--gpus", "8", "--gpu-mem", "80"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for text in (
        "ZeRO-3 parameter all-gathers",
        "gradient reduce-scatter",
        "loss chunk buffers",
        "FEASIBLE",
        "activations (micro batch 8, checkpointed",
    ):
        assert text in out


def test_communication_formulas():
    cfg = load_config(
        None,
        [
            "loss.name=isogclr_tempnet",
            "ray.num_workers=4",
            "train.micro_batch_size=32",
            "train.global_batch_size=256",
            "deepspeed.zero_stage=2",
            NO_DATA,
        ],
    )
    plan = planner.make_plan(cfg, 4, 80, num_samples=1000, vocab_size=300)
    comm = {c.name.split(" (")[0]: c.bytes for c in plan.comm}
    k, b, d, accum, p = 4, 32, plan.shape.embed_dim, 2, plan.shape.trainable_params
    assert comm["DRO feature all-gather"] == accum * (k - 1) * b * 2 * d * 4  # fp32 features
    assert f"2·n·d = {2 * k * b * d:,} values" in next(
        c.name for c in plan.comm if c.name.startswith("DRO feature")
    )
    assert comm["gradient reduce-scatter"] == pytest.approx(accum * (k - 1) / k * 4 * p)
    assert comm["updated parameter all-gather"] == pytest.approx((k - 1) / k * 4 * p)
    state = next(i for i in plan.memory if i.name.startswith("DRO state shard"))
    assert state.bytes == 250 * (4 * 8 + 1) and state.where == "host"  # 1000 samples / 4 ranks


# A real single-process DeepSpeed step on CPU: the project's CLIP model + iSogCLR/TempNet DRO loss,
# peak RSS growth from just before the model is built to after three optimizer steps.
MEASURE = r"""
import json, os, resource, sys
import torch
import deepspeed  # noqa: F401  (its import cost belongs to the baseline)
from dist_tempnet.config import load_config
from dist_tempnet.runtime.engine import build_engine
from dist_tempnet.tasks.base import default_param_groups
from dist_tempnet.losses.contrastive import build_contrastive_loss
from dist_tempnet.models.clip import build_clip_model
from dist_tempnet.tasks.clip import CLIPTrainModule, loss_kwargs
from dist_tempnet.runtime.trainer import init_distributed

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

cfg = load_config(None, json.loads(sys.argv[1]))
vocab, samples = int(sys.argv[2]), int(sys.argv[3])
init_distributed()
base = rss()
clip = build_clip_model(cfg.model.preset, "", cfg.model.overrides, vocab_size=vocab,
                        image_size=cfg.data.image_size, max_text_len=cfg.data.max_text_len)
kwargs = loss_kwargs(cfg, clip.config.projection_dim)
loss = build_contrastive_loss(cfg.loss.name, num_samples=samples, **kwargs)
module = CLIPTrainModule(clip, loss)
engine = build_engine(module, default_param_groups(module, cfg.train.weight_decay), cfg)
b, length, size = cfg.train.micro_batch_size, cfg.data.max_text_len, cfg.data.image_size
gen = torch.Generator().manual_seed(0)
for step in range(3):
    pixels = torch.randn(b, 3, size, size, generator=gen)
    ids = torch.randint(0, vocab, (b, length), generator=gen)
    out = engine(pixels, ids, torch.ones(b, length, dtype=torch.long), torch.arange(b) + step * b)
    engine.backward(out[0] if isinstance(out, tuple) else out.loss)
    engine.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = sum(p.numel() for p in module.parameters())
print("RESULT", json.dumps({"peak_delta": peak - base, "params": params}))
"""

MEASURED_OVERRIDES = [
    "loss.name=isogclr_tempnet",
    "ray.num_workers=1",
    "train.micro_batch_size=16",
    "train.global_batch_size=16",
    "train.precision=fp32",
    'model.overrides={"projection_dim": 256, '
    '"vision_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, '
    '"num_attention_heads": 8}, '
    '"text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, '
    '"num_attention_heads": 8}}',
    NO_DATA,
]


def measure_tiny_run(overrides: list[str], vocab: int, samples: int) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # Its own world of one, never a rendezvous address inherited from the test process.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(overrides), str(vocab), str(samples)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("stage", [2, pytest.param(0, marks=pytest.mark.slow)])
def test_plan_matches_measured_peak_of_a_real_tiny_run(stage):
    overrides = [*MEASURED_OVERRIDES, f"deepspeed.zero_stage={stage}"]
    vocab, samples = 8192, 4096
    cfg = load_config(None, overrides)
    plan = planner.make_plan(cfg, 1, 64, device="cpu", num_samples=samples, vocab_size=vocab)
    measured = measure_tiny_run(overrides, vocab, samples)
    assert measured["params"] == plan.shape.total_params
    ratio = plan.peak_bytes / measured["peak_delta"]
    print(
        f"ZeRO-{stage}: planned {plan.peak_bytes / 2**20:.0f} MiB, "
        f"measured {measured['peak_delta'] / 2**20:.0f} MiB "
        f"(ratio {ratio:.2f})"
    )
    assert 0.75 <= ratio <= 1.25


def test_loss_chunk_buffers_follow_the_compiled_kernel():
    """The compiled chunk kernel (loss.compile auto/true: the default on CUDA) holds one fp32 logits
    buffer, the eager TempNet path two; under bf16 a bf16 ∂z buffer comes on top."""

    def buffers(*overrides: str) -> tuple[planner.MemoryItem, int]:
        cfg = load_config(LLM_ZERO3, [NO_DATA, "loss.name=tempnet", "loss.chunk_size=4096", *overrides])
        shape = planner.model_shape(cfg)
        items, _ = planner.lm_loss_items(shape, cfg, 2 if cfg.train.precision == "bf16" else 4)
        item = next(item for item in items if item.name.startswith("loss chunk buffers"))
        return item, 4096 * shape.vocab_size  # micro batch × seq_len is well above the chunk

    compiled, elements = buffers("train.precision=bf16")
    assert compiled.bytes == elements * (4 + 2) and "1 fp32 + 1 bf16" in compiled.name
    eager, _ = buffers("train.precision=bf16", "loss.compile=false")
    assert eager.bytes == elements * (4 + 4 + 2) and "2 fp32 + 1 bf16" in eager.name
    fp32, _ = buffers("train.precision=fp32")
    assert fp32.bytes == elements * 4 and "(1 fp32," in fp32.name
