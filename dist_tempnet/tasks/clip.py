"""The CLIP task: a transformers CLIPModel + one contrastive loss of the DRO family.

Plugs into the training loop through the `tasks.base.Task` contract.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_tempnet import metric_names as names
from dist_tempnet.config import Config
from dist_tempnet.data import clip_batches, eval_batches, load_text_tokenizer, resolve_manifest
from dist_tempnet.data.collate import normalize_pixels, pin_memory_for
from dist_tempnet.dro_state import DROState
from dist_tempnet.losses.contrastive import build_contrastive_loss, gamma_schedule
from dist_tempnet.metrics import (
    class_text_embeddings,
    gather_rows,
    lockstep,
    retrieval_metrics,
    zero_shot_predictions,
)
from dist_tempnet.models.clip import build_clip_model, encode_images, encode_texts
from dist_tempnet.tasks.base import ParamGroup, StepResult, Task, default_param_groups, readout_temperature
from dist_tempnet.tasks.clip_benchmarks import BenchmarkContext, run_benchmarks
from dist_tempnet.tau_stats import (
    RecentSamples,
    accuracy_on_classes,
    rarest_classes,
    rho_floor_warning,
    spearman,
    spread_metrics,
    spread_tensors,
)

logger = logging.getLogger(__name__)

# How many of the most recently trained samples (per rank) τ is related to class frequency over.
RECENT_TAU_SAMPLES = 4096
# Losses whose τ is per sample, in [loss.tau_min, loss.tau_max] (InfoNCE and SogCLR have one global τ).
PER_SAMPLE_TAU = ("isogclr", "isogclr_tempnet")


class CLIPTrainModule(nn.Module):
    """What DeepSpeed wraps: the CLIP encoders and the loss (with its TempNets) in one module."""

    def __init__(self, clip: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.loss_fn = loss_fn

    def embed(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        dtype = next(self.clip.parameters()).dtype
        img = txt = None
        if pixel_values is not None:
            if pixel_values.dtype == torch.uint8:  # batches travel as uint8; normalize on the device
                pixel_values = normalize_pixels(pixel_values, dtype)
            img = F.normalize(encode_images(self.clip, pixel_values.to(dtype)).float(), dim=-1)
        if input_ids is not None:
            txt = F.normalize(encode_texts(self.clip, input_ids, attention_mask).float(), dim=-1)
        return img, txt

    def forward(self, pixel_values, input_ids, attention_mask, sample_ids):
        # A plain tuple of tensors: ZeRO-3 finds its backward hooks through the outputs' tensors.
        img, txt = self.embed(pixel_values, input_ids, attention_mask)
        out = self.loss_fn(img, txt, sample_ids)
        self.last_stats = out.tensor_stats
        return out.loss, out.image_tau, out.text_tau


def tokenize(tokenizer, texts: list[str], max_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids[name] = int(value)
    return ids


class CLIPTask(Task):
    unit = "samples"

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device) -> None:
        super().__init__(cfg, rank, world, device)
        self.train_manifest = resolve_manifest(cfg.data.path, cfg.data.train_split)
        tok_path = cfg.data.tokenizer or self.train_manifest.tokenizer_path
        if not tok_path:
            raise ValueError(
                f"data.tokenizer: no tokenizer configured and {self.train_manifest.path} names none"
            )
        self.tokenizer = load_text_tokenizer(tok_path)
        clip = build_clip_model(
            cfg.model.preset,
            cfg.model.pretrained,
            cfg.model.overrides,
            attn_implementation=cfg.model.attn_implementation,
            revision=cfg.model.revision,
            **(
                {}
                if cfg.model.pretrained
                else {
                    "vocab_size": len(self.tokenizer),
                    "special_ids": _special_ids(self.tokenizer),
                    "image_size": cfg.data.image_size,
                    "max_text_len": cfg.data.max_text_len,
                }
            ),
        )
        self.embed_dim = clip.config.projection_dim
        self.num_samples = self.train_manifest.id_stop
        self.loss_fn = build_contrastive_loss(
            cfg.loss.name, num_samples=self.num_samples, **loss_kwargs(cfg, self.embed_dim)
        )
        self.module = CLIPTrainModule(clip, self.loss_fn)
        if cfg.loss.name in PER_SAMPLE_TAU and rank == 0:
            message = rho_floor_warning(cfg.loss.rho, cfg.train.global_batch_size - 1, "negatives per anchor")
            if message:
                logger.warning(message)
        self._last_eval_tau: dict[str, torch.Tensor] = {}
        # Per class share of the training split, when the data says (the long-tailed demo does).
        frequency = self.train_manifest.metadata.get("class_frequency")
        self.class_frequency = torch.tensor(frequency, dtype=torch.float64) if frequency else None
        self._recent = RecentSamples(RECENT_TAU_SAMPLES)

    # -- the task contract (tasks.base.Task) ----------------------------------------------------

    def param_groups(self) -> list[ParamGroup]:
        tempnet_params = [p for n, p in self.loss_fn.named_parameters() if "tempnet" in n and p.requires_grad]
        skip = {id(p) for p in tempnet_params}
        groups = default_param_groups(self.module, self.cfg.train.weight_decay, skip=skip)
        return groups + self.tempnet_group(tempnet_params)

    def _open_stream(self, resume):
        d = self.cfg.data
        return clip_batches(
            self.train_manifest,
            batch_size=self.cfg.train.micro_batch_size,
            rank=self.rank,
            world_size=self.world,
            tokenizer=self.tokenizer,
            image_size=d.image_size,
            num_workers=d.num_workers,
            shuffle_buffer=d.shuffle_buffer,
            seed=self.cfg.run.seed,
            max_text_len=d.max_text_len,
            allow_corrupt=d.allow_corrupt,
            resume=resume,
            caption_key=d.caption_key,
            crop_scale=tuple(d.train_crop_scale) if d.train_crop_scale else None,
            pin_memory=pin_memory_for(self.device),  # uint8 batches, pinned, copied non_blocking
        )

    def units(self, batch: dict[str, Any]) -> int:
        return int(batch["sample_ids"].shape[0])

    def before_step(self, step: int) -> dict[str, float]:
        lo = self.cfg.loss
        if not hasattr(self.loss_fn, "gamma"):
            return {}
        gamma = gamma_schedule(
            lo.gamma_schedule, lo.gamma, step, self.cfg.train.steps, gamma_min=lo.gamma_min
        )
        self.loss_fn.gamma = gamma
        return {"gamma": gamma}

    def forward(self, engine, batch: dict[str, Any]) -> StepResult:
        loss, image_tau, text_tau = engine(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["sample_ids"]
        )
        if "labels" in batch:  # data with classes (the demo sets): τ vs class frequency at eval
            self._recent.add(image=image_tau, text=text_tau, label=batch["labels"])
        metrics = clip_step_metrics(loss, image_tau, text_tau, engine.module.last_stats)
        lo = self.cfg.loss
        for prefix, tau in zip(self.tau_prefixes(), (image_tau, text_tau)):
            metrics.update(spread_tensors(tau, prefix, lo.tau_min, lo.tau_max))
        return StepResult(loss, metrics)

    def state(self) -> dict[str, Any]:
        """This rank's part of a checkpoint: exact data position and DRO state shard."""
        state = super().state()
        dro = getattr(self.loss_fn, "dro_state", None)
        if dro is not None:
            state["dro_state"] = dro.state_dict()
        return state

    def load_state(self, states: list[dict[str, Any]], old_world: int) -> None:
        """Re-shard the DRO state and remap the data position from every old rank (any world size)."""
        super().load_state(states, old_world)
        dro = getattr(self.loss_fn, "dro_state", None)
        if dro is None:
            return
        shards = [state["dro_state"] for state in states]
        self.loss_fn.dro_state = DROState.from_shard_states(shards, self.rank, self.world, device=dro.device)

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        """The data's own eval split (when it has one) plus the configured standard benchmarks."""
        try:
            manifest = resolve_manifest(self.cfg.data.path, self.cfg.data.eval_split)
        except (FileNotFoundError, ValueError):  # no eval split (e.g. an index of training shards)
            manifest = None
        module: CLIPTrainModule = engine.module
        was_training = module.training
        module.eval()
        try:
            results = self._evaluate(module, manifest) if manifest is not None else {}
            results.update(run_benchmarks(self.benchmark_context(module), self.cfg.eval))
            return results
        finally:
            module.train(was_training)

    def benchmark_context(self, module: CLIPTrainModule) -> BenchmarkContext:
        d, max_len = self.cfg.data, self.cfg.data.max_text_len

        def texts(captions: list[str]) -> torch.Tensor:
            return module.embed(None, **tokenize(self.tokenizer, captions, max_len, self.device))[1]

        return BenchmarkContext(
            encode_images=lambda pixels: module.embed(pixels)[0],
            encode_texts=texts,
            image_size=d.image_size,
            batch_size=self.cfg.eval.batch_size or self.cfg.train.micro_batch_size,
            num_workers=d.num_workers,
            device=self.device,
            rank=self.rank,
            world=self.world,
            caption_key=d.caption_key,
            tokenizer=self.tokenizer,
            max_text_len=max_len,
        )

    def _evaluate(self, module: CLIPTrainModule, manifest) -> dict[str, float]:
        d = self.cfg.data
        stream = eval_batches(
            manifest,
            batch_size=self.cfg.train.micro_batch_size,
            rank=self.rank,
            world_size=self.world,
            tokenizer=self.tokenizer,
            image_size=d.image_size,
            max_text_len=d.max_text_len,
        )
        imgs, txts, labels = [], [], []
        limit = self.cfg.eval.max_batches
        for i, (batch, real) in enumerate(lockstep(iter(stream), self.device)):
            if limit and i >= limit:  # every rank has the same limit, so lockstep holds
                break
            b = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            img, txt = module.embed(b["pixel_values"], b["input_ids"], b["attention_mask"])
            if real:
                imgs.append(img)
                txts.append(txt)
                if "labels" in b:
                    labels.append(b["labels"])
        img_all = gather_rows(torch.cat(imgs))
        txt_all = gather_rows(torch.cat(txts))
        results = retrieval_metrics(img_all, txt_all)
        results = {f"eval/{k}": v for k, v in results.items()}
        meta = manifest.metadata
        lab_all = gather_rows(torch.cat(labels)) if labels else None
        if self.cfg.eval.zero_shot and labels and meta.get("class_names") and meta.get("prompt_templates"):
            correct = self._zero_shot(module, img_all, lab_all, meta)
            results["eval/zero_shot_acc"] = float(correct.double().mean())
            results["eval/zero_shot_chance"] = 1.0 / len(meta["class_names"])
            if self._long_tailed():
                # Rarest / most frequent third of the classes by their share of the training split.
                freq = self.class_frequency
                results["eval/zero_shot_acc_tail"] = accuracy_on_classes(
                    correct, lab_all, rarest_classes(freq)
                )
                results["eval/zero_shot_acc_head"] = accuracy_on_classes(
                    correct, lab_all, rarest_classes(-freq)
                )
        self._last_eval_tau = self._eval_tau(module, img_all, txt_all)
        results |= self._tau_frequency_metrics(lab_all)
        return {k: v for k, v in results.items() if v == v}  # NaN: undefined here (e.g. constant τ)

    def _long_tailed(self) -> bool:
        freq = self.class_frequency
        return freq is not None and bool(freq.max() > freq.min())

    def _tau_frequency_metrics(self, eval_labels: torch.Tensor | None) -> dict[str, float]:
        """τ spread of the held-out split (TempNet) and of the last trained samples (any per-sample τ),
        and Spearman's correlation of τ with the sample's class frequency when the data has one."""
        lo, out = self.cfg.loss, {}
        for side, tau in self._last_eval_tau.items():
            out |= {
                f"eval/{k}": v for k, v in spread_metrics(tau, f"tau_{side}", lo.tau_min, lo.tau_max).items()
            }
            if self._long_tailed() and eval_labels is not None:
                freq = self.class_frequency[eval_labels.cpu()]
                out[f"eval/tau_freq_spearman_{side}"] = spearman(tau, freq)
        if not len(self._recent):
            return out
        recent = {name: gather_rows(col.to(self.device)).cpu() for name, col in self._recent.columns.items()}
        per_sample = lo.name in PER_SAMPLE_TAU
        for side in ("image", "text"):
            if per_sample:
                out |= {f"train_tau/{k}": v for k, v in spread_metrics(recent[side], side).items()}
            labeled = recent["label"] >= 0
            if per_sample and self._long_tailed() and labeled.any():
                freq = self.class_frequency[recent["label"][labeled].long()]
                out[f"train_tau/freq_spearman_{side}"] = spearman(recent[side][labeled], freq)
        return out

    def _zero_shot(
        self, module: CLIPTrainModule, img_all: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any]
    ) -> torch.Tensor:
        """[N] bool: is each held-out image's nearest class prompt its own class?"""
        classes, templates = meta["class_names"], meta["prompt_templates"]
        prompts = [t.format(c) for c in classes for t in templates]
        enc = tokenize(self.tokenizer, prompts, self.cfg.data.max_text_len, self.device)
        _, txt = module.embed(None, enc["input_ids"], enc["attention_mask"])
        class_emb = class_text_embeddings(txt.view(len(classes), len(templates), -1))
        return zero_shot_predictions(img_all, class_emb).cpu() == labels.cpu()

    def _eval_tau(
        self, module: CLIPTrainModule, img: torch.Tensor, txt: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        loss_fn = module.loss_fn
        out = {}
        for side, feats in (("image", img), ("text", txt)):
            tempnet = getattr(loss_fn, f"{side}_tempnet", None)
            if isinstance(tempnet, nn.Module):
                out[side] = tempnet(feats).float().cpu()  # TempNet computes in fp32 itself
        return out

    def tau_prefixes(self) -> list[str]:
        return ["tau/image", "tau/text"] if self.cfg.loss.name in PER_SAMPLE_TAU else []

    def tau_samples(self) -> tuple[dict[str, torch.Tensor], str, str]:
        taus = {f"{side} τ": tau for side, tau in self._last_eval_tau.items()}
        return taus, "τ (TempNet, held-out split)", "samples"


def _logged_elsewhere(stat: str) -> bool:
    return stat in ("loss", "gamma", "rho", "tau") or stat.startswith("tau_")


def clip_step_metrics(
    loss: torch.Tensor,
    image_tau: torch.Tensor | None,
    text_tau: torch.Tensor | None,
    stats: dict[str, torch.Tensor | float],
) -> dict[str, torch.Tensor | float]:
    """One micro-step's metrics as device tensors: no host sync; the loop syncs at log_every.
    Each quantity once: τ statistics are the tau/* and train/tau/* here, γ is logged by before_step (with its
    schedule), ρ is a constant (a param)."""
    metrics: dict[str, torch.Tensor | float] = {names.LOSS: loss.detach()}
    metrics.update(_tau_stats(image_tau, "image"))
    metrics.update(_tau_stats(text_tau, "text"))
    side = names.TAU_SIDE
    metrics[f"{names.TAU}mean"] = 0.5 * (metrics[f"{side}image_mean"] + metrics[f"{side}text_mean"])
    internals = {
        k if "/" in k else f"{names.LOSS_INTERNALS}{k}": v
        for k, v in stats.items()
        if not _logged_elsewhere(k)
    }
    metrics.update(internals)
    return metrics


def _tau_stats(tau: torch.Tensor | None, side: str) -> dict[str, torch.Tensor | float]:
    if tau is None or tau.numel() == 0:
        return {f"{names.TAU_SIDE}{side}_mean": float("nan")}
    t = tau.detach().float()
    p = f"{names.TAU_SIDE}{side}_"
    return {f"{p}mean": t.mean(), f"{p}min": t.min(), f"{p}max": t.max()}


def loss_kwargs(cfg: Config, embed_dim: int) -> dict[str, Any]:
    """Constructor arguments of the configured loss (see losses.contrastive.build_contrastive_loss)."""
    lo = cfg.loss
    state_device = lo.state_device
    if state_device == "auto":
        state_device = "cuda" if torch.cuda.is_available() else "cpu"
    if lo.name == "clip":
        return {"init_tau": lo.init_tau, "learnable": True}
    common = {"gamma": lo.gamma, "state_device": state_device}
    if lo.name == "sogclr":
        return common | {
            "init_tau": min(max(lo.init_tau, lo.tau_min), lo.tau_max),
            "learnable": False,
            "tau_min": lo.tau_min,
            "tau_max": lo.tau_max,
        }
    if lo.name == "isogclr":
        return common | {
            "rho": lo.rho,
            "tau_init": min(max(lo.init_tau, lo.tau_min), lo.tau_max),
            "tau_min": lo.tau_min,
            "tau_max": lo.tau_max,
            "tau_lr": lo.isogclr_tau_lr,
        }
    return (
        common
        | {
            "rho": lo.rho,
            "embed_dim": embed_dim,
            "num_prototypes": lo.num_prototypes,
            "tau_min": lo.tau_min,
            "tau_max": lo.tau_max,
            "dropout": lo.tempnet_dropout,
        }
        | readout_temperature(lo)
    )
