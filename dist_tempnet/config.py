"""Typed run configuration: dataclasses loaded from YAML plus dotted CLI overrides.

Everything is validated in the driver before any worker starts, and every error names the key
(and the file it came from) together with what was expected. The dataclass defaults ARE the
embedded default job (a tiny CLIP on the procedural demo data, 2 CPU workers, ZeRO-2), so
`dist-tempnet train` with no config runs something real.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dist_tempnet.metric_names import renamed


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent with another."""


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, was altered since it was saved (SHA-256), or holds objects
    other than tensors and plain types; it is not loaded. (Here, next to ConfigError, so that the CLI
    reports it without importing torch.)"""


@dataclass
class RunConfig:
    name: str = "clip-tiny"
    task: str = "clip"  # clip | lm
    seed: int = 0
    # Root for run outputs (Ray storage, checkpoints when running without Ray). Relative paths are
    # resolved against the driver's working directory: Ray workers run elsewhere.
    output_dir: str = "runs"
    description: str = ""


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 128
    micro_batch_size: int = 64  # per worker and micro step
    precision: str = "fp32"  # fp32 | bf16
    lr: float = 2.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 1.0
    log_every: int = 10
    max_consecutive_nonfinite: int = 10
    # LM only: `scratch` | `finetune` | `tempnet_only`
    mode: str = "scratch"
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    # A dataset root or directory holding dataset.json (make-shards output, or an index written by
    # `dist-tempnet index-shards`), or shards written elsewhere: a directory of img2dataset .tar files
    # (with _stats.json), a brace pattern (`cc12m/{00000..01242}.tar`), a list, or URLs (https://,
    # s3://, gs://, pipe:...). With `demo: true` a missing directory gets the demo data first.
    path: str | list[str] = "data/demo_clip"
    demo: bool = True
    train_split: str = "train"
    eval_split: str = "eval"
    tokenizer: str = ""  # local dir, tokenizer.json or hub id; empty: model.pretrained's, else the dataset's
    num_workers: int = 0
    shuffle_buffer: int = 512
    allow_corrupt: bool = False
    # With allow_corrupt: warn (log and MLflow tag) once the skipped share of the samples read exceeds this.
    warn_skipped_fraction: float = 0.01
    image_size: int = 32
    max_text_len: int = 16
    # Shards written elsewhere (img2dataset): the caption field; images may be jpg/jpeg/png/webp.
    caption_key: str = "txt"
    # Training images: random resized crop with this area scale (OpenCLIP's default); eval center-crops.
    # An empty list: center-crop in training too.
    train_crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    seq_len: int = 128  # LM token shards
    demo_num_train: int = 4096
    demo_num_eval: int = 512
    # Long-tailed demo CLIP data (all 0: the balanced demo); see data.demo_clip.LongTail.
    demo_class_zipf: float = 0.0  # class share ∝ rank^-zipf; > 0 also balances the eval split
    demo_caption_noise: float = 0.0  # share of training captions describing a wrong class
    demo_generic_captions: float = 0.0  # share naming only the color or only the shape


@dataclass
class ModelConfig:
    # `clip_tiny` | `clip_vit_b32` (CLIP) ; `llama_tiny` | `gpt2_tiny` | `gpt2_125m` | `llama_1b` |
    # `llama_1.3b` | `llama2_7b` (LM). `pretrained` overrides the preset: a local save_pretrained
    # directory or a Hugging Face hub id (e.g. meta-llama/Llama-2-7b-chat-hf), as from_pretrained takes.
    preset: str = "clip_tiny"
    pretrained: str = ""
    revision: str = ""  # hub branch, tag or commit of `pretrained` (empty: main)
    # Extra keys merged into the transformers config (e.g. {"num_hidden_layers": 4}).
    overrides: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"


@dataclass
class LossConfig:
    # CLIP: clip | sogclr | isogclr | isogclr_tempnet ; LM: ce | tempnet
    name: str = "clip"
    rho: float = 8.0
    gamma: float = 0.8
    gamma_schedule: str = "constant"  # constant | cosine
    gamma_min: float = 0.2
    init_tau: float = 0.07
    tau_min: float = 0.005
    tau_max: float = 0.05
    num_prototypes: int = 256
    tempnet_hidden: int = 256
    tempnet_dropout: float = 0.0
    # Initial temperature of TempNet's readout softmax; empty: the paper's (0.01 for CLIP, 1.0 for the LM).
    tempnet_readout_temperature: float | None = None
    tempnet_lr: float = 1.0e-4
    tempnet_weight_decay: float = 0.0
    # TempNet is not trained for the first N steps: τ keeps its initial value while the features form.
    tempnet_freeze_steps: int = 0
    isogclr_tau_lr: float = 1.0e-2
    chunk_size: int = 4096  # LM fused loss token chunk
    compile: str = "auto"  # LM fused loss chunk kernel via torch.compile: auto (on CUDA) | true | false
    state_device: str = "cpu"  # where the per-sample DRO state lives


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    # None: DeepSpeed's own default (on for ZeRO-3, off for ZeRO-1/2).
    overlap_comm: bool | None = None
    # Raw keys merged last into the generated DeepSpeed config (escape hatch for experts).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RayConfig:
    address: str = ""  # empty: RAY_ADDRESS if set, else a local Ray started for this job
    num_workers: int = 2
    use_gpu: str = "auto"  # auto | true | false (YAML booleans are accepted)
    cpus_per_worker: int = 1
    max_failures: int = 0
    # Ray placement group strategy for the workers: PACK (default), SPREAD, STRICT_PACK, or STRICT_SPREAD
    # (one worker per node, e.g. to spread over the nodes of a cluster).
    placement_strategy: str = "PACK"
    quiet: bool = True


@dataclass
class MLflowConfig:
    tracking_uri: str = ""  # empty: sqlite:///<cwd>/mlflow.db (made absolute for the workers)
    experiment: str = "dist_tempnet"
    run_name: str = ""
    enabled: bool = True
    log_system_metrics: bool = False
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep_last: int = 2
    # Also keep the checkpoint with the best value of this logged metric (e.g. eval/zero_shot_acc).
    keep_best_metric: str = ""
    keep_best_mode: str = "max"  # max | min


@dataclass
class EvalConfig:
    every: int = 0  # 0: only at the end
    zero_shot: bool = True
    max_batches: int = 0  # 0: the whole eval split
    # Standard benchmarks (tasks/clip_benchmarks.py), each run when its path is set:
    # zero-shot on an ImageFolder tree (root/<class_dir>/*.jpg) or shards/an index with a `cls` field,
    zero_shot_path: str = ""
    classnames: str = ""  # imagenet | a file (one per line / JSON list) | "": directory names
    templates: str = "openai"  # openai (80 templates) | simple | a file of templates with {}
    # retrieval on a Karpathy-split JSON (Flickr30k/COCO) or shards with several captions per image.
    retrieval_path: str = ""
    retrieval_images: str = ""  # image root for the Karpathy JSON (default: the JSON's directory)
    retrieval_split: str = "test"
    batch_size: int = 0  # 0: train.micro_batch_size


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (self.ray.num_workers * self.train.micro_batch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CLIP_LOSSES = ("clip", "sogclr", "isogclr", "isogclr_tempnet")
# str settings whose documented values include true/false: YAML reads those as booleans.
BOOL_OR_STR_KEYS = ("ray.use_gpu", "loss.compile")
LM_LOSSES = ("ce", "tempnet")
LM_MODES = ("scratch", "finetune", "tempnet_only")


# ---------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; allow the harmless int→float widening and
    YAML 1.1's habit of reading `1e-3` as a string."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for candidate in args[:-1]:  # the first member that accepts the value (e.g. str | list[str])
            try:
                return _coerce(value, candidate, key, source)
            except ConfigError:
                pass
        return _coerce(value, args[-1], key, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            # inf/nan parse as floats (YAML `.inf`, `inf`), but no setting means anything with them.
            if not math.isfinite(number):
                raise ConfigError(f"{source}: key '{key}' expects a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and key in BOOL_OR_STR_KEYS:
            return str(value).lower()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{prefix.rstrip('.')}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(
            f"{source}: unknown key '{key}' (known keys in this section: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name] or {}, f"{prefix}{f.name}.", source)
        else:
            kwargs[f.name] = _coerce(raw[f.name], tp, prefix + f.name, source)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=50` → (['train', 'steps'], 50); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override '{text}': key must be dotted, e.g. train.steps=50")
    if not value.strip():
        return parts, ""
    try:
        return parts, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.problem or exc})") from exc


def _apply_override(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{'.'.join(parts)}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the embedded default), apply dotted overrides, validate."""
    raw: dict[str, Any] = {}
    source = "embedded default"
    if path:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    for text in overrides or []:
        parts, value = parse_override(text)
        _apply_override(raw, parts, value)
    if overrides:
        source += " + overrides"
    cfg = _build(Config, raw, "", source)
    validate(cfg, source)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` (e.g. inside a worker or from a checkpoint)."""
    cfg = _build(Config, raw, "", "config dict")
    validate(cfg, "config dict")
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Validation: impossible combinations fail here, in the driver.


def _check(cond: bool, source: str, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {key}: {message}")


def _one_of(value: Any, allowed: tuple, source: str, key: str) -> None:
    _check(value in allowed, source, key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")


def validate(cfg: Config, source: str = "config") -> None:
    t, r = cfg.train, cfg.ray
    _one_of(cfg.run.task, ("clip", "lm"), source, "run.task")
    _check(bool(cfg.run.name.strip()), source, "run.name", "must not be empty")
    _check(t.steps > 0, source, "train.steps", f"must be > 0, got {t.steps}")
    _check(t.micro_batch_size > 0, source, "train.micro_batch_size", f"must be > 0, got {t.micro_batch_size}")
    _check(r.num_workers > 0, source, "ray.num_workers", f"must be > 0, got {r.num_workers}")
    per_step = r.num_workers * t.micro_batch_size
    _check(
        t.global_batch_size > 0 and t.global_batch_size % per_step == 0,
        source,
        "train.global_batch_size",
        f"{t.global_batch_size} is not divisible by ray.num_workers × train.micro_batch_size "
        f"= {r.num_workers} × {t.micro_batch_size} = {per_step}",
    )
    _one_of(t.precision, ("fp32", "bf16"), source, "train.precision")
    _one_of(t.lr_schedule, ("cosine", "constant"), source, "train.lr_schedule")
    _check(t.lr > 0, source, "train.lr", f"must be > 0, got {t.lr}")
    _check(0 <= t.min_lr_ratio <= 1, source, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.warmup_steps >= 0, source, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _check(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
        source,
        "train.betas",
        f"must be two numbers in [0,1), got {t.betas}",
    )
    _check(t.grad_clip >= 0, source, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
    _check(t.log_every > 0, source, "train.log_every", f"must be > 0, got {t.log_every}")
    _one_of(t.mode, LM_MODES, source, "train.mode")
    _one_of(cfg.deepspeed.zero_stage, (0, 1, 2, 3), source, "deepspeed.zero_stage")
    r.use_gpu = r.use_gpu.lower()
    _check(
        not cfg.deepspeed.offload_optimizer,
        source,
        "deepspeed.offload_optimizer",
        "true is not supported: ZeRO-Offload fails in deepspeed.initialize with our client torch AdamW "
        "(per-group lr) and needs DeepSpeed's CPU Adam, a C++ op JIT-compiled at start that has not been "
        "built or tested with this project; use deepspeed.zero_stage=3 to save GPU memory instead",
    )
    _one_of(r.use_gpu, ("auto", "true", "false"), source, "ray.use_gpu")
    _check(r.cpus_per_worker > 0, source, "ray.cpus_per_worker", f"must be > 0, got {r.cpus_per_worker}")
    _one_of(
        r.placement_strategy,
        ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        source,
        "ray.placement_strategy",
    )
    _check(
        r.max_failures >= -1,
        source,
        "ray.max_failures",
        f"must be >= -1 (-1: unlimited), got {r.max_failures}",
    )
    _check(cfg.checkpoint.every >= 0, source, "checkpoint.every", f"must be >= 0, got {cfg.checkpoint.every}")
    _check(
        cfg.checkpoint.keep_last >= 1,
        source,
        "checkpoint.keep_last",
        f"must be >= 1, got {cfg.checkpoint.keep_last}",
    )
    _one_of(cfg.checkpoint.keep_best_mode, ("max", "min"), source, "checkpoint.keep_best_mode")
    new_name = renamed(cfg.checkpoint.keep_best_metric)
    _check(
        new_name is None,
        source,
        "checkpoint.keep_best_metric",
        f"the metric {cfg.checkpoint.keep_best_metric!r} is now logged as {new_name!r}; use that name",
    )
    _check(cfg.eval.every >= 0, source, "eval.every", f"must be >= 0, got {cfg.eval.every}")
    _check(cfg.data.num_workers >= 0, source, "data.num_workers", f"must be >= 0, got {cfg.data.num_workers}")
    _check(bool(cfg.data.path), source, "data.path", "must name a dataset directory")
    _check(cfg.data.shuffle_buffer >= 0, source, "data.shuffle_buffer", "must be >= 0")
    scale = cfg.data.train_crop_scale
    _check(
        scale == [] or (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1),
        source,
        "data.train_crop_scale",
        f"must be [] or [min, max] with 0 < min <= max <= 1, got {scale}",
    )
    _check(bool(cfg.data.caption_key), source, "data.caption_key", "must name the caption field (e.g. txt)")
    _check(
        0 <= cfg.data.warn_skipped_fraction <= 1,
        source,
        "data.warn_skipped_fraction",
        f"must be in [0, 1], got {cfg.data.warn_skipped_fraction}",
    )
    d = cfg.data
    _check(
        math.isfinite(d.demo_class_zipf) and d.demo_class_zipf >= 0,
        source,
        "data.demo_class_zipf",
        f"must be a finite number >= 0, got {d.demo_class_zipf}",
    )
    for key in ("demo_caption_noise", "demo_generic_captions"):
        value = getattr(d, key)
        _check(0 <= value <= 1, source, f"data.{key}", f"must lie in [0, 1], got {value}")
    _check(
        d.demo_caption_noise + d.demo_generic_captions <= 1,
        source,
        "data.demo_generic_captions",
        f"data.demo_caption_noise + data.demo_generic_captions must be <= 1, got "
        f"{d.demo_caption_noise} + {d.demo_generic_captions}",
    )
    lo = cfg.loss
    _one_of(lo.gamma_schedule, ("constant", "cosine"), source, "loss.gamma_schedule")
    _check(0 < lo.gamma <= 1, source, "loss.gamma", f"must be in (0, 1], got {lo.gamma}")
    _check(
        0 < lo.gamma_min <= lo.gamma,
        source,
        "loss.gamma_min",
        f"must be in (0, loss.gamma], got {lo.gamma_min}",
    )
    _check(
        0 < lo.tau_min < lo.tau_max,
        source,
        "loss.tau_min",
        f"need 0 < tau_min < tau_max, got {lo.tau_min}, {lo.tau_max}",
    )
    _check(lo.init_tau > 0, source, "loss.init_tau", f"must be > 0, got {lo.init_tau}")
    _check(lo.tempnet_lr >= 0, source, "loss.tempnet_lr", f"must be >= 0, got {lo.tempnet_lr}")
    _check(
        lo.tempnet_readout_temperature is None or lo.tempnet_readout_temperature > 0,
        source,
        "loss.tempnet_readout_temperature",
        f"must be > 0 (or empty for the paper's default), got {lo.tempnet_readout_temperature}",
    )
    _check(
        lo.tempnet_freeze_steps >= 0,
        source,
        "loss.tempnet_freeze_steps",
        f"must be >= 0, got {lo.tempnet_freeze_steps}",
    )
    _check(lo.chunk_size > 0, source, "loss.chunk_size", f"must be > 0, got {lo.chunk_size}")
    lo.compile = lo.compile.lower()
    _one_of(lo.compile, ("auto", "true", "false"), source, "loss.compile")
    _one_of(lo.state_device, ("cpu", "cuda", "auto"), source, "loss.state_device")
    if cfg.run.task == "clip":
        _one_of(lo.name, CLIP_LOSSES, source, "loss.name")
        _check(
            cfg.model.preset.startswith("clip") or bool(cfg.model.pretrained),
            source,
            "model.preset",
            f"task 'clip' needs a clip_* preset or model.pretrained, got {cfg.model.preset!r}",
        )
    else:
        _one_of(lo.name, LM_LOSSES, source, "loss.name")
        _check(
            not cfg.model.preset.startswith("clip"),
            source,
            "model.preset",
            f"task 'lm' needs a causal LM preset, got {cfg.model.preset!r}",
        )
        if t.mode == "finetune":
            _check(
                bool(cfg.model.pretrained),
                source,
                "model.pretrained",
                "train.mode=finetune starts from a pretrained model: set it to a local directory or hub id",
            )
        if t.mode == "tempnet_only":
            _check(
                lo.name == "tempnet",
                source,
                "loss.name",
                "train.mode=tempnet_only trains only the TempNet: use loss.name=tempnet",
            )
