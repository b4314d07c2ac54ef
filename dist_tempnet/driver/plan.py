"""`dist-tempnet plan`: per-GPU memory and per-step communication of a config, before launch.

    dist-tempnet plan --config configs/llm_1b_zero3.yaml --gpus 8 --gpu-mem 80 [key=value ...]

Parameter counts come from the real transformers model of the config: tiny models are built, big
ones on the meta device (shapes only, no memory). Everything else is arithmetic on those shapes:

Model states (bytes per parameter; P trainable, F frozen, K GPUs; DeepSpeed 0.19.8's optimizers,
read off its sources): bf16 training keeps 16-bit params and grads, fp32 master weights, fp32
grads for the step and Adam's two fp32 moments, and ZeRO shards them by stage:

    stage 0  (bf16: DeepSpeed's FP16_Optimizer)   2(P+F) + 2P grads + 4P master + 4P fp32 grads + 8P Adam
    stage 1  (bf16: BF16_Optimizer)               2(P+F) + 2P grads + 4P fp32 grad buffer + (4P + 8P)/K
    stage 2                                       2(P+F) + (2P grads + 4P master + 4P fp32 grads + 8P Adam)/K
                                                  + the gradient reduce bucket, 2·min(P, reduce_bucket_size)
    stage 3                                       (2(P+F) + 18P)/K + 4·largest layer (gathered params+grads)

fp32 training drops the 16-bit copies (params and grads are 4 bytes; ZeRO-1/2 still keep an fp32
master partition). Stage 2 and 3 match DeepSpeed's own estimators
(`estimate_zero2/3_model_states_mem_needs`) except that stage 3 also counts the 16-bit parameter
shards (2P/K) that DeepSpeed's formula leaves out; tests/test_plan.py checks the agreement.

Activations (bytes per token per transformer layer, a = 2 for bf16, 4 for fp32; counted from the
tensors autograd saves in the transformers implementations, checked with saved-tensor hooks in
tests/test_plan.py; scaled-dot-product attention keeps no s×s matrix):

    CLIP block (LayerNorm, quick-GELU MLP)   a·(8h + 3I)
    LLaMA block (RMSNorm, SwiGLU, GQA)       2·(4 + a)·h + a·(4h + 2h_kv + 4I)   (RMSNorm saves an fp32 copy)
    GPT-2 block (LayerNorm, tanh-GELU)       a·(9h + 6I)   (python tanh-GELU keeps several I-size terms)

times micro batch × tokens per sample × layers. With activation checkpointing (LM task) only each
layer's input (a·h) is kept, plus one layer's full set while it is recomputed. A frozen LM
(train.mode=tempnet_only) runs under no_grad: only one block's widest intermediates are alive at
a time, a·(2h + max(2h + 2h_kv, 3I)) per token.

Losses: the fused LM loss holds two chunk×V fp32 buffers (one for plain chunked CE), the N×d fp32
hidden gradient and the V×d fp32 head gradient, where N = tokens of the micro batch; plain
(transformers) cross-entropy would hold N×V logits in the activation dtype, their fp32 copy and the
fp32 log-softmax (printed for comparison). The CLIP DRO loss keeps the gathered features (n×2d
fp32, n = K·B) and about a dozen B×n fp32 matrices; its per-sample state (4 float64 fields + extras
+ a visited flag per sample) is sharded over ranks, N_samples/K rows each, on loss.state_device.

Communication per optimizer step, bytes each GPU sends (ring algorithms; G micro steps per step):
ZeRO-0 all-reduces gradients once per step, 2(K−1)/K·S; ZeRO-1 reduce-scatters once, ZeRO-2 every
micro step, (K−1)/K·S each, and both all-gather the updated 16-bit params, (K−1)/K·S_params;
ZeRO-3 all-gathers the params in forward and again in backward every micro step and
reduce-scatters the gradients. The DRO loss all-gathers image+text features (2·n·d values
received, (K−1)·B·2d sent) and O(n) float64 statistics per micro step; the LM loss one scalar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_tempnet.config import Config, ConfigError

GIB = 2**30
GB = 1e9
# DeepSpeed 0.19.8 defaults (zero/config.py): gradient reduce bucket in elements.
REDUCE_BUCKET_SIZE = 500_000_000
# Parameters up to this count are built for real; bigger models only on the meta device.
REAL_BUILD_MAX_PARAMS = 20_000_000
# CUDA context, NCCL communicators and cuBLAS workspaces per GPU process, before any tensor.
CUDA_RUNTIME_BYTES = 2 * GIB
# Share of the card the allocator can actually hand out (fragmentation, caching slack).
USABLE_FRACTION = 0.95
# The CLIP DRO loss's B×n float32 temporaries (rows, columns, logits, weights, masks, gradients).
DRO_LOSS_BN_MATRICES = 12


# ---------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class Tower:
    """A stack of identical transformer blocks and the tokens one sample feeds it."""

    name: str
    style: str  # clip | llama | gpt2
    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    tokens_per_sample: int


@dataclass
class ModelShape:
    task: str
    description: str
    backbone_params: int
    tempnet_params: int
    trainable_params: int
    frozen_params: int
    largest_layer_params: int
    towers: list[Tower]
    vocab_size: int = 0
    hidden_size: int = 0
    embed_dim: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return self.backbone_params + self.tempnet_params


def count_params(module: nn.Module) -> int:
    """Distinct parameters (tied weights once), as DeepSpeed and optimizers see them."""
    return sum(p.numel() for p in module.parameters())


def largest_layer_params(module: nn.Module) -> int:
    """Largest parameter count held directly by one module (DeepSpeed's 'largest layer')."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


def _build(factory, real: bool) -> nn.Module:
    if real:
        return factory()
    with torch.device("meta"):
        return factory()


def build_for_counting(factory) -> tuple[nn.Module, bool]:
    """Meta first (free); rebuilt for real when small enough that it costs nothing."""
    model = _build(factory, real=False)
    if count_params(model) <= REAL_BUILD_MAX_PARAMS:
        return _build(factory, real=True), True
    return model, False


def _local_vocab_size(cfg: Config) -> int | None:
    """The vocabulary the task would use: the configured or dataset tokenizer, when present here."""
    try:
        from dist_tempnet.data import load_text_tokenizer, resolve_manifest

        path = cfg.data.tokenizer
        if not path:
            path = resolve_manifest(cfg.data.path, cfg.data.train_split).tokenizer_path
        if not path or not Path(path).exists():
            return None
        return len(load_text_tokenizer(path))
    except Exception:  # noqa: BLE001 - no local dataset/tokenizer: fall back to the preset's vocabulary
        return None


def _pretrained_config(cfg: Config):
    path = Path(cfg.model.pretrained)
    if cfg.model.pretrained and (path / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    return None


def clip_shape(cfg: Config, vocab_size: int | None = None) -> ModelShape:
    from transformers import CLIPModel

    from dist_tempnet.models.clip import clip_config

    notes: list[str] = []
    config = _pretrained_config(cfg)
    if config is None:
        if cfg.model.pretrained:
            notes.append(
                f"model.pretrained '{cfg.model.pretrained}' not found here: using preset {cfg.model.preset}"
            )
        vocab = vocab_size or _local_vocab_size(cfg)
        if vocab is None:
            notes.append("no tokenizer found here: text vocabulary of the preset")
        kwargs: dict[str, Any] = {"image_size": cfg.data.image_size, "max_text_len": cfg.data.max_text_len}
        if vocab:
            kwargs["vocab_size"] = vocab
        config = clip_config(cfg.model.preset, cfg.model.overrides, **kwargs)
    model, real = build_for_counting(lambda: CLIPModel(config))
    vision, text = config.vision_config, config.text_config
    towers = [
        Tower(
            "vision",
            "clip",
            vision.num_hidden_layers,
            vision.hidden_size,
            vision.hidden_size,
            vision.intermediate_size,
            (vision.image_size // vision.patch_size) ** 2 + 1,
        ),
        Tower(
            "text",
            "clip",
            text.num_hidden_layers,
            text.hidden_size,
            text.hidden_size,
            text.intermediate_size,
            cfg.data.max_text_len,
        ),
    ]
    tempnet = loss_params(cfg, config.projection_dim)
    backbone = count_params(model)
    how = "built" if real else "meta device"
    return ModelShape(
        task="clip",
        description=f"{cfg.model.preset} (CLIPModel, {how})",
        backbone_params=backbone,
        tempnet_params=tempnet,
        trainable_params=backbone + tempnet,
        frozen_params=0,
        largest_layer_params=largest_layer_params(model),
        towers=towers,
        embed_dim=config.projection_dim,
        vocab_size=text.vocab_size,
        notes=notes,
    )


def loss_params(cfg: Config, embed_dim: int) -> int:
    """Parameters of the configured CLIP loss (TempNets, learnable τ), built as the task builds it."""
    from dist_tempnet.losses.contrastive import build_contrastive_loss
    from dist_tempnet.tasks.clip import loss_kwargs

    kwargs = loss_kwargs(cfg, embed_dim)
    if "state_device" in kwargs:
        kwargs["state_device"] = "cpu"
    # Built for real: TempNets are small, and a state of one sample costs nothing.
    return count_params(build_contrastive_loss(cfg.loss.name, num_samples=1, **kwargs))


def _decoder_tower(config, seq_len: int) -> Tower:
    if config.model_type == "gpt2":
        return Tower(
            "decoder",
            "gpt2",
            config.n_layer,
            config.n_embd,
            config.n_embd,
            config.n_inner or 4 * config.n_embd,
            seq_len,
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Tower(
        "decoder",
        "llama",
        config.num_hidden_layers,
        config.hidden_size,
        kv_heads * head_dim,
        config.intermediate_size,
        seq_len,
    )


def lm_shape(cfg: Config, vocab_size: int | None = None) -> ModelShape:
    from transformers import AutoModelForCausalLM

    from dist_tempnet.models.lm import lm_config
    from dist_tempnet.tempnet import LMTempNet

    notes: list[str] = []
    config = _pretrained_config(cfg)
    if config is None:
        if cfg.model.pretrained:
            notes.append(
                f"model.pretrained '{cfg.model.pretrained}' not found here: using preset {cfg.model.preset}"
            )
        vocab = vocab_size or _local_vocab_size(cfg)
        try:
            config = lm_config(cfg.model.preset, cfg.model.overrides, vocab_size=vocab)
        except ValueError as exc:
            raise ConfigError(f"{exc} (no tokenizer found here: pass --vocab-size)") from exc
    model, real = build_for_counting(lambda: AutoModelForCausalLM.from_config(config))
    vocab = model.get_output_embeddings().weight.shape[0]
    hidden = model.get_output_embeddings().weight.shape[1]
    tempnet = 0
    if cfg.loss.name == "tempnet":
        with torch.device("meta"):
            tempnet = count_params(LMTempNet(vocab, hidden_size=cfg.loss.tempnet_hidden))
    backbone = count_params(model)
    frozen = cfg.train.mode == "tempnet_only"
    how = "built" if real else "meta device"
    return ModelShape(
        task="lm",
        description=f"{cfg.model.preset} ({type(model).__name__}, {how})",
        backbone_params=backbone,
        tempnet_params=tempnet,
        trainable_params=tempnet + (0 if frozen else backbone),
        frozen_params=backbone if frozen else 0,
        largest_layer_params=largest_layer_params(model),
        towers=[_decoder_tower(config, cfg.data.seq_len)],
        vocab_size=vocab,
        hidden_size=hidden,
        notes=notes,
    )


def model_shape(cfg: Config, vocab_size: int | None = None) -> ModelShape:
    return clip_shape(cfg, vocab_size) if cfg.run.task == "clip" else lm_shape(cfg, vocab_size)


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass
class MemoryItem:
    name: str
    bytes: float
    phase: str  # always | backward | step (peak = always + max(backward, step))
    where: str = "gpu"  # gpu | host


def block_bytes_per_token(tower: Tower, act_bytes: int) -> float:
    """Bytes autograd keeps per token for one block of `tower` (see the module docstring)."""
    h, kv, inter, a = tower.hidden, tower.kv_hidden, tower.intermediate, act_bytes
    if tower.style == "clip":
        return a * (8 * h + 3 * inter)
    if tower.style == "llama":
        return 2 * (4 + a) * h + a * (4 * h + 2 * kv + 4 * inter)
    return a * (9 * h + 6 * inter)


def inference_bytes_per_token(tower: Tower, act_bytes: int) -> float:
    # Under no_grad only the residual stream, the normed input and the widest block intermediates
    # (q, k, v and output, or the MLP's up/gate/activation) are alive at once.
    h, kv = tower.hidden, tower.kv_hidden
    return act_bytes * (2 * h + max(2 * h + 2 * kv, 3 * tower.intermediate))


def outside_blocks_bytes_per_token(tower: Tower, act_bytes: int) -> float:
    # Embedding output and final norm input (LLaMA's RMSNorm keeps an fp32 copy besides).
    if tower.style == "llama":
        return (4 + act_bytes) * tower.hidden
    return act_bytes * tower.hidden


def activation_bytes(shape: ModelShape, cfg: Config, act_bytes: int) -> tuple[float, str]:
    """Saved activations of one micro batch and a one-line description of how they were counted."""
    micro = cfg.train.micro_batch_size
    total = 0.0
    frozen = shape.frozen_params > 0
    checkpointed = cfg.train.activation_checkpointing and shape.task == "lm" and not frozen
    for tower in shape.towers:
        tokens = micro * tower.tokens_per_sample
        block = block_bytes_per_token(tower, act_bytes)
        outside = outside_blocks_bytes_per_token(tower, act_bytes)
        if frozen:
            total += tokens * inference_bytes_per_token(tower, act_bytes)
        elif checkpointed:
            total += tokens * (tower.layers * act_bytes * tower.hidden + block + outside)
        else:
            total += tokens * (tower.layers * block + outside)
        if shape.task == "clip" and tower.name == "vision":
            total += micro * 3 * cfg.data.image_size**2 * act_bytes  # pixels, kept for the patch conv
    how = (
        "frozen LM, no_grad: one layer alive"
        if frozen
        else ("checkpointed: layer inputs + one layer" if checkpointed else "all layers")
    )
    return total, how


def model_state_items(
    shape: ModelShape, stage: int, precision: str, k: int, device: str, offload_optimizer: bool = False
) -> list[MemoryItem]:
    """Parameters, gradients, optimizer states and ZeRO buffers per GPU (module docstring table).

    With `offload_optimizer` (ZeRO-Offload, stage >= 1 only: runtime.engine ignores it at stage 0) the
    fp32 master partition, the Adam moments, the fp32 gradient partition of the step and the step's
    temporaries are held in host memory instead of on the GPU."""
    p, f = shape.trainable_params, shape.frozen_params
    lp = 2 if precision == "bf16" else 4  # 16-bit params/grads in bf16 training, fp32 otherwise
    shard = k if stage >= 1 else 1
    param_shard = k if stage == 3 else 1
    grad_shard = k if stage >= 2 else 1
    items = [
        MemoryItem(
            f"parameters ({'bf16' if lp == 2 else 'fp32'}{', /K' if param_shard > 1 else ''})",
            lp * (p + f) / param_shard,
            "always",
        ),
        MemoryItem(f"Adam moments (fp32{', /K' if shard > 1 else ''})", 8 * p / shard, "always"),
    ]
    if lp == 2 or stage >= 1:
        items.append(
            MemoryItem(f"fp32 master weights{' (/K)' if shard > 1 else ''}", 4 * p / shard, "always")
        )
    grads_phase = "always" if stage >= 1 else "backward"
    items.append(
        MemoryItem(
            f"gradients ({'bf16' if lp == 2 else 'fp32'}{', /K' if grad_shard > 1 else ''})",
            lp * p / grad_shard,
            grads_phase,
        )
    )
    if lp == 2 and stage == 1:
        items.append(MemoryItem("fp32 gradient accumulation buffer", 4 * p, "always"))
    elif lp == 2:
        items.append(
            MemoryItem(
                f"fp32 gradients for the step{' (/K)' if grad_shard > 1 else ''}", 4 * p / grad_shard, "step"
            )
        )
    elif stage in (1, 2, 3):
        items.append(MemoryItem("flat fp32 gradient copy for the step (/K)", 4 * p / k, "step"))
    if stage in (1, 2):
        items.append(MemoryItem("gradient reduce bucket", lp * min(p, REDUCE_BUCKET_SIZE), "always"))
    elif stage == 0:
        items.append(MemoryItem("gradient all-reduce bucket", lp * min(p, REDUCE_BUCKET_SIZE), "backward"))
    else:
        items.append(
            MemoryItem("ZeRO-3 gathered layer (params + grads)", 4 * shape.largest_layer_params, "backward")
        )
    offload = offload_optimizer and stage >= 1 and device == "cuda"
    if offload:
        for item in items:
            if item.name.startswith(_OFFLOADED):
                item.where = "host"
    if device == "cpu" or offload:
        # torch's foreach AdamW allocates the sqrt(v) denominator and the update; CUDA uses fused AdamW.
        where = "host" if offload else "gpu"
        items.append(MemoryItem("AdamW step temporaries (CPU foreach)", 8 * p / shard, "step", where))
    return items


# What ZeRO-Offload moves to host memory (item names of model_state_items).
_OFFLOADED = ("Adam moments", "fp32 master weights", "flat fp32 gradient copy", "fp32 gradients for the step")


def lm_loss_items(shape: ModelShape, cfg: Config, act_bytes: int) -> tuple[list[MemoryItem], float]:
    """Fused/chunked loss buffers, and what plain N×V cross-entropy would hold instead."""
    n = cfg.train.micro_batch_size * cfg.data.seq_len
    v, d = shape.vocab_size, shape.hidden_size
    chunk = min(cfg.loss.chunk_size, n)
    # fp32 logits (the eager TempNet path adds a probability buffer; the compiled kernel, the default
    # on CUDA, does not), and under bf16 ∂z as the backward matmuls' bf16 operand.
    eager = cfg.loss.name == "tempnet" and cfg.loss.compile == "false"
    fp32_buffers = 2 if eager else 1
    bf16_buffers = 1 if act_bytes == 2 else 0
    what = f"{fp32_buffers} fp32" + (" + 1 bf16" if bf16_buffers else "")
    size = chunk * v * (4 * fp32_buffers + 2 * bf16_buffers)
    items = [MemoryItem(f"loss chunk buffers ({what}, {chunk}×V)", size, "backward")]
    if shape.frozen_params == 0:
        items.append(
            MemoryItem("loss gradients (N×d hidden + V×d head, fp32)", 4 * (n * d + v * d), "backward")
        )
    plain = n * v * (act_bytes + 4 + 4)
    return items, plain


def dro_items(shape: ModelShape, cfg: Config, k: int, num_samples: int, on_gpu: bool) -> list[MemoryItem]:
    if cfg.loss.name == "clip":
        return []
    b, d = cfg.train.micro_batch_size, shape.embed_dim
    n = k * b
    fields = 4 + (2 if cfg.loss.name == "isogclr" else 0)
    rows = math.ceil(num_samples / k)
    return [
        MemoryItem(
            "DRO loss: gathered features + B×n matrices",
            4 * (2 * n * d + DRO_LOSS_BN_MATRICES * b * n),
            "backward",
        ),
        MemoryItem(
            f"DRO state shard ({rows:,} samples × {fields} float64 + flag)",
            rows * (8 * fields + 1),
            "always",
            "gpu" if on_gpu else "host",
        ),
    ]


@dataclass
class CommItem:
    name: str
    bytes: float


@dataclass
class Plan:
    cfg: Config
    shape: ModelShape
    gpus: int
    gpu_mem_gib: float
    device: str
    memory: list[MemoryItem]
    comm: list[CommItem]
    plain_ce_bytes: float
    activation_note: str
    num_samples: int
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def phase_total(self, phase: str, where: str = "gpu") -> float:
        return sum(i.bytes for i in self.memory if i.phase == phase and i.where == where)

    @property
    def peak_bytes(self) -> float:
        """Per-GPU peak: what is always held plus the larger of the backward and optimizer-step peaks."""
        return self.phase_total("always") + max(self.phase_total("backward"), self.phase_total("step"))

    @property
    def usable_bytes(self) -> float:
        return USABLE_FRACTION * self.gpu_mem_gib * GIB

    @property
    def feasible(self) -> bool:
        return not self.reasons


def comm_items(shape: ModelShape, cfg: Config, k: int, accum: int) -> list[CommItem]:
    if k == 1:
        return []
    lp = 2 if cfg.train.precision == "bf16" else 4
    stage = cfg.deepspeed.zero_stage
    grads = lp * shape.trainable_params
    params_all = lp * (shape.trainable_params + shape.frozen_params)
    frac = (k - 1) / k
    items: list[CommItem] = []
    if stage == 0:
        items.append(CommItem("gradient all-reduce (once per step)", 2 * frac * grads))
    elif stage in (1, 2):
        times = accum if stage == 2 else 1
        items.append(CommItem(f"gradient reduce-scatter (×{times} micro steps)", times * frac * grads))
        items.append(CommItem("updated parameter all-gather", frac * lp * shape.trainable_params))
    else:
        passes = 1 if shape.frozen_params and not shape.trainable_params - shape.tempnet_params else 2
        items.append(
            CommItem(
                f"ZeRO-3 parameter all-gathers (fwd{'+bwd' if passes == 2 else ''} × {accum})",
                passes * accum * frac * params_all,
            )
        )
        items.append(CommItem(f"gradient reduce-scatter (×{accum} micro steps)", accum * frac * grads))
    b = cfg.train.micro_batch_size
    if shape.task == "clip" and cfg.loss.name != "clip":
        n, d = k * b, shape.embed_dim
        fields = 4 + (2 if cfg.loss.name == "isogclr" else 0)
        feat_bytes = 4  # the CLIP task normalizes features in fp32 before the loss gathers them
        items.append(
            CommItem(
                f"DRO feature all-gather (2·n·d = {2 * n * d:,} values in, ×{accum})",
                accum * (k - 1) * b * 2 * d * feat_bytes,
            )
        )
        stats = (k - 1) * b * 8 + 2 * frac * n * (fields + 3) * 8 + (k - 1) * b * fields * 8
        items.append(CommItem(f"DRO ids + statistics (O(n) float64, ×{accum})", accum * stats))
    elif shape.task == "clip":
        items.append(
            CommItem(
                f"InfoNCE feature all-gather with grad (fwd+bwd, ×{accum})",
                accum * ((k - 1) * b * 2 * shape.embed_dim * 4 + 2 * frac * k * b * 2 * shape.embed_dim * 4),
            )
        )
    else:
        items.append(CommItem(f"valid-token count all-reduce (×{accum})", accum * 2 * frac * 8))
    return items


def default_num_samples(cfg: Config) -> tuple[int, str]:
    try:
        from dist_tempnet.data import resolve_manifest

        return resolve_manifest(cfg.data.path, cfg.data.train_split).id_stop, "dataset manifest"
    except Exception:  # noqa: BLE001 - dataset not reachable from here
        pass
    if cfg.data.demo:
        return cfg.data.demo_num_train, "data.demo_num_train"
    return 10_000_000, "assumed; pass --num-samples"


def make_plan(
    cfg: Config,
    gpus: int,
    gpu_mem_gib: float,
    *,
    device: str = "cuda",
    num_samples: int | None = None,
    vocab_size: int | None = None,
    shape: ModelShape | None = None,
) -> Plan:
    """Plan `cfg` on `gpus` devices of `gpu_mem_gib` GiB each (device='cpu' models a CPU run)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    shape = shape or model_shape(cfg, vocab_size)
    t, stage = cfg.train, cfg.deepspeed.zero_stage
    act_bytes = 2 if t.precision == "bf16" else 4
    notes = list(shape.notes)
    if num_samples is None:
        num_samples, source = default_num_samples(cfg)
        if shape.task == "clip" and cfg.loss.name != "clip":
            notes.append(f"DRO state sized for {num_samples:,} samples ({source})")
    memory = model_state_items(shape, stage, t.precision, gpus, device, cfg.deepspeed.offload_optimizer)
    acts, act_note = activation_bytes(shape, cfg, act_bytes)
    memory.append(MemoryItem(f"activations (micro batch {t.micro_batch_size}, {act_note})", acts, "backward"))
    plain = 0.0
    if shape.task == "lm":
        loss_items, plain = lm_loss_items(shape, cfg, act_bytes)
        memory += loss_items
    else:
        # On a CPU run the "device" is host memory, so the state counts wherever it lives.
        on_device = device == "cpu" or cfg.loss.state_device in ("cuda", "auto")
        memory += dro_items(shape, cfg, gpus, num_samples, on_device)
    if device == "cuda":
        memory.append(MemoryItem("CUDA context, NCCL, workspaces", CUDA_RUNTIME_BYTES, "always"))
    accum = max(1, t.global_batch_size // max(1, gpus * t.micro_batch_size))
    plan = Plan(
        cfg,
        shape,
        gpus,
        gpu_mem_gib,
        device,
        memory,
        comm_items(shape, cfg, gpus, accum),
        plain,
        act_note,
        num_samples,
        notes=notes,
    )
    if cfg.ray.num_workers != gpus:
        plan.notes.append(
            f"the config has ray.num_workers={cfg.ray.num_workers}; planned for {gpus} "
            f"(launch with ray.num_workers={gpus})"
        )
    plan.reasons = infeasibility_reasons(plan)
    return plan


def infeasibility_reasons(plan: Plan) -> list[str]:
    t = plan.cfg.train
    reasons = []
    per_step = plan.gpus * t.micro_batch_size
    if t.global_batch_size % per_step:
        reasons.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by {plan.gpus} GPUs × "
            f"train.micro_batch_size={t.micro_batch_size} = {per_step}"
        )
    if plan.peak_bytes > plan.usable_bytes:
        big = sorted((i for i in plan.memory if i.where == "gpu"), key=lambda i: -i.bytes)[:3]
        top = ", ".join(f"{i.name} {i.bytes / GIB:.1f} GiB" for i in big)
        reasons.append(
            f"needs {plan.peak_bytes / GIB:.1f} GiB per GPU but {plan.gpu_mem_gib:g} GiB GPUs give "
            f"{plan.usable_bytes / GIB:.1f} GiB usable ({USABLE_FRACTION:.0%}); largest: {top}. "
            + suggestions(plan)
        )
    return reasons


def suggestions(plan: Plan) -> str:
    cfg = plan.cfg
    tips = []
    if cfg.deepspeed.zero_stage < 3 and plan.gpus > 1:
        tips.append("deepspeed.zero_stage=3")
    if plan.shape.task == "lm" and not cfg.train.activation_checkpointing and not plan.shape.frozen_params:
        tips.append("train.activation_checkpointing=true")
    if cfg.train.micro_batch_size > 1:
        tips.append(f"train.micro_batch_size={cfg.train.micro_batch_size // 2}")
    if cfg.train.precision == "fp32":
        tips.append("train.precision=bf16")
    tips.append("more GPUs")
    return "Try " + ", ".join(tips) + "."


# ---------------------------------------------------------------------------------------------
# Output


def _gib(x: float) -> str:
    return f"{x / GIB:9.2f}"


def _row(name: str, value: str, width: int = 70) -> str:
    return f"    {name:<{width}}{value}"


def format_plan(plan: Plan, config_name: str = "") -> str:
    cfg, shape = plan.cfg, plan.shape
    t = cfg.train
    accum = max(1, t.global_batch_size // max(1, plan.gpus * t.micro_batch_size))
    tokens = " + ".join(f"{tw.tokens_per_sample} {tw.name}" for tw in shape.towers)
    unit = "GPU" if plan.device == "cuda" else "CPU worker"
    lines = [
        f"dist-tempnet plan: {config_name or 'embedded default'} ({cfg.run.task}, loss {cfg.loss.name}"
        + (f", mode {t.mode}" if cfg.run.task == "lm" else "")
        + ")",
        f"  model        {shape.description}: {shape.backbone_params:,} params"
        f" + TempNet/τ {shape.tempnet_params:,}",
        f"  trainable    {shape.trainable_params:,}   frozen {shape.frozen_params:,}   "
        f"largest layer {shape.largest_layer_params:,}",
        f"  setup        {plan.gpus} × {plan.gpu_mem_gib:g} GiB, ZeRO-{cfg.deepspeed.zero_stage}, "
        f"{t.precision}, micro batch {t.micro_batch_size} × ({tokens}) tokens, accumulation {accum}, "
        f"activation checkpointing {'on' if t.activation_checkpointing else 'off'}",
        "",
        f"{'memory per ' + unit:<74}{'GiB':>9}",
    ]
    for phase, title in (
        ("always", "held throughout"),
        ("backward", "forward/backward peak"),
        ("step", "optimizer step peak"),
    ):
        items = [i for i in plan.memory if i.phase == phase and i.where == "gpu"]
        if not items:
            continue
        lines.append(f"  [{title}]")
        lines += [_row(i.name, _gib(i.bytes)) for i in items]
    lines.append(_row("peak = held + max(forward/backward, step)", _gib(plan.peak_bytes), 72)[2:])
    usable = f"usable ({USABLE_FRACTION:.0%} of {plan.gpu_mem_gib:g} GiB)"
    lines.append(_row(usable, _gib(plan.usable_bytes), 72)[2:])
    host = [i for i in plan.memory if i.where == "host"]
    if host:
        lines.append("host memory per worker")
        lines += [_row(i.name, _gib(i.bytes)) for i in host]
    if plan.plain_ce_bytes:
        lines.append(
            f"  (plain N×V cross-entropy would hold {plan.plain_ce_bytes / GIB:.2f} GiB of logits instead "
            "of the chunk buffers)"
        )
    lines += ["", f"{'communication per optimizer step, sent per GPU':<74}{'GB':>9}"]
    if plan.comm:
        lines += [_row(c.name, f"{c.bytes / GB:9.3f}") for c in plan.comm]
        lines.append(_row("total", f"{sum(c.bytes for c in plan.comm) / GB:9.3f}", 72)[2:])
    else:
        lines.append("    none (1 GPU)")
    lines.append("")
    lines += [f"note: {n}" for n in plan.notes]
    if plan.feasible:
        lines.append(
            f"FEASIBLE: peak {plan.peak_bytes / GIB:.1f} GiB of {plan.usable_bytes / GIB:.1f} GiB usable "
            f"per {unit} ({plan.peak_bytes / plan.usable_bytes:.0%})"
        )
    else:
        lines += [f"INFEASIBLE: {r}" for r in plan.reasons]
    return "\n".join(lines)
