"""The LM task: a transformers causal LM + LMTempNet trained with the fused robust loss.

Modes (train.mode): `scratch` and `finetune` train the LM and TempNet jointly; `tempnet_only`
freezes the LM (no gradients, no optimizer state) and trains TempNet alone, the paper's
LLaMA2-Chat setting. loss.name=ce trains with plain (chunked) cross-entropy, the baseline.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from dist_tempnet import comm
from dist_tempnet import metric_names as names
from dist_tempnet.config import Config
from dist_tempnet.data import eval_batches, load_text_tokenizer, resolve_manifest, token_batches
from dist_tempnet.data.collate import pin_memory_for
from dist_tempnet.losses.lm import chunked_cross_entropy, tempnet_lm_loss, tempnet_tau_from_hidden
from dist_tempnet.metrics import gather_rows, lockstep, perplexity
from dist_tempnet.models.lm import build_causal_lm
from dist_tempnet.tasks.base import ParamGroup, StepResult, Task, default_param_groups, readout_temperature
from dist_tempnet.tau_stats import rho_floor_warning, spearman, spread_metrics, spread_tensors
from dist_tempnet.tempnet import LMTempNet

logger = logging.getLogger(__name__)

# Held-out tokens (per rank) whose τ is related to predictive entropy and token frequency.
MAX_TAU_TOKENS = 65536


def head_weight(lm: nn.Module) -> torch.Tensor:
    return lm.get_output_embeddings().weight


def final_hidden(lm: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states (after the final norm) without computing the N×V logits.

    use_cache=False: a KV cache is for generation; in training it only allocates and copies.
    """
    return lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def inputs_and_labels(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token inputs and labels of a token batch; targets outside `loss_mask` become -100."""
    ids = batch["input_ids"]
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    if "loss_mask" in batch:
        labels = labels.masked_fill(~batch["loss_mask"][:, 1:].to(labels.device).bool(), -100)
    return inputs, labels


class LMTrainModule(nn.Module):
    """What DeepSpeed wraps; forward returns (loss, tau or None, num_valid, plain CE)."""

    def __init__(
        self,
        lm: nn.Module,
        tempnet: LMTempNet | None,
        loss_name: str,
        rho: float,
        chunk_size: int,
        frozen_lm: bool,
        compiled: bool | None = None,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.tempnet = tempnet
        self.loss_name = loss_name
        self.rho = rho
        self.chunk_size = chunk_size
        self.frozen_lm = frozen_lm
        self.compiled = compiled  # the fused loss's chunk kernel: None = torch.compile on CUDA only

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        loss_scale_count: torch.Tensor | None,
        eval_sums: bool = False,
    ):
        if eval_sums:
            # Inside forward so ZeRO-3 has gathered the head and TempNet weights used directly.
            return self.eval_sums(input_ids, labels)
        if self.frozen_lm:
            with torch.no_grad():
                hidden = final_hidden(self.lm, input_ids)
        else:
            hidden = final_hidden(self.lm, input_ids)
        weight = head_weight(self.lm)
        if self.frozen_lm:
            weight = weight.detach()
        if self.loss_name == "ce":
            loss = chunked_cross_entropy(
                hidden, weight, labels, chunk_size=self.chunk_size, loss_scale_count=loss_scale_count
            )
            return loss, None
        out = tempnet_lm_loss(
            hidden,
            weight,
            labels,
            self.tempnet,
            self.rho,
            chunk_size=self.chunk_size,
            loss_scale_count=loss_scale_count,
            compiled=self.compiled,
        )
        return out.loss, out.tau

    @torch.no_grad()
    def eval_sums(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = final_hidden(self.lm, input_ids)
        weight = head_weight(self.lm)
        tau = None
        if self.tempnet is not None:
            tau = tempnet_tau_from_hidden(hidden.reshape(-1, hidden.shape[-1]), weight, self.tempnet)
        per_token: list[torch.Tensor] = []
        sums = token_eval_sums(hidden, weight, labels, tau, self.chunk_size, per_token=per_token)
        return sums, torch.cat(per_token) if per_token else sums.new_zeros(0, 3)


@torch.no_grad()
def token_eval_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tau: torch.Tensor | None,
    chunk_size: int,
    ignore_index: int = -100,
    per_token: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """[nll at τ=1, nll at τ (TempNet), correct top-1, valid tokens] summed over tokens, chunked.

    With TempNet and a `per_token` list, appends [valid tokens, 3] rows (τ, predictive entropy of
    softmax(z) at τ = 1, target id) per chunk: what τ is related to at evaluation.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    sums = torch.zeros(4, dtype=torch.float64, device=h.device)
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        valid = y[sl] != ignore_index
        if not valid.any():
            continue
        logits = (h[sl][valid] @ weight.t()).float()
        target = y[sl][valid]
        sums[0] += torch.nn.functional.cross_entropy(logits, target, reduction="sum").double()
        scaled = logits / tau[sl][valid].float().unsqueeze(1) if tau is not None else logits
        sums[1] += torch.nn.functional.cross_entropy(scaled, target, reduction="sum").double()
        sums[2] += (logits.argmax(dim=-1) == target).sum().double()
        sums[3] += valid.sum().double()
        if per_token is not None and tau is not None:
            logp = torch.log_softmax(logits, dim=-1)
            entropy = -(logp.exp() * logp).sum(dim=-1)
            rows = [tau[sl][valid].double(), entropy.double(), target.double()]
            per_token.append(torch.stack(rows, dim=1))
    return sums


def lm_step_metrics(
    loss: torch.Tensor, tau: torch.Tensor | None, labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """Loss and τ statistics of one micro-step as device tensors, and (τ, counted-token mask).

    No host sync (no .item(), boolean-mask indexing or data-dependent branch): the training loop
    accumulates these and syncs once per log_every.
    """
    metrics: dict[str, torch.Tensor] = {names.LOSS: loss.detach()}
    if tau is None:
        return metrics, None
    valid = labels.reshape(-1) != -100
    counted = valid | ~valid.any()  # every token when none is valid
    tau = tau.detach()
    metrics["tau/mean"] = torch.where(counted, tau, 0).sum() / counted.sum()
    metrics["tau/min"] = torch.where(counted, tau, torch.inf).amin()
    metrics["tau/max"] = torch.where(counted, tau, -torch.inf).amax()
    return metrics, (tau, counted)


class LMTask(Task):
    unit = "tokens"

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device) -> None:
        super().__init__(cfg, rank, world, device)
        self.train_manifest = resolve_manifest(cfg.data.path, cfg.data.train_split)
        tok_path = cfg.data.tokenizer or cfg.model.pretrained or self.train_manifest.tokenizer_path
        tok_revision = cfg.model.revision if str(tok_path) == cfg.model.pretrained else ""
        self.tokenizer = load_text_tokenizer(tok_path, tok_revision) if tok_path else None
        special = {}
        if self.tokenizer is not None:
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                if getattr(self.tokenizer, name, None) is not None:
                    special[name] = int(getattr(self.tokenizer, name))
        lm = build_causal_lm(
            cfg.model.preset,
            cfg.model.pretrained,
            cfg.model.overrides,
            attn_implementation=cfg.model.attn_implementation,
            revision=cfg.model.revision,
            dtype=torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32,
            **(
                {}
                if cfg.model.pretrained
                else {"vocab_size": len(self.tokenizer) if self.tokenizer else None, "special_ids": special}
            ),
        )
        if cfg.train.activation_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        frozen = cfg.train.mode == "tempnet_only"
        if frozen:
            lm.requires_grad_(False)
        vocab = head_weight(lm).shape[0]
        lo = cfg.loss
        tempnet = None
        if lo.name == "tempnet":
            tempnet = LMTempNet(
                vocab,
                hidden_size=lo.tempnet_hidden,
                tau_min=lo.tau_min,
                tau_max=lo.tau_max,
                dropout=lo.tempnet_dropout,
                **readout_temperature(lo),
            )
        compiled = {"auto": None, "true": True, "false": False}[lo.compile]
        self.module = LMTrainModule(lm, tempnet, lo.name, lo.rho, lo.chunk_size, frozen, compiled)
        message = rho_floor_warning(lo.rho, vocab, "vocabulary size") if tempnet is not None else None
        if message and rank == 0:
            logger.warning(message)
        self.last_tau: tuple[torch.Tensor, torch.Tensor] | None = None  # (τ, counted), on the device

    # -- the task contract (tasks.base.Task) -----------------------------------------------------

    def param_groups(self) -> list[ParamGroup]:
        groups: list[ParamGroup] = []
        if not self.module.frozen_lm:
            groups += default_param_groups(self.module.lm, self.cfg.train.weight_decay)
        if self.module.tempnet is not None:
            groups += self.tempnet_group(list(self.module.tempnet.parameters()))
        return groups

    def after_engine(self, engine) -> None:
        """ZeRO-3: parameters used outside their module's forward must be registered as external."""
        if self.cfg.deepspeed.zero_stage != 3:
            return
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        module = engine.module
        register_external_parameter(module, head_weight(module.lm))
        if module.tempnet is not None:
            register_external_parameter(module, module.tempnet.first.weight)
            register_external_parameter(module, module.tempnet.first.bias)

    def _open_stream(self, resume):
        d = self.cfg.data
        return token_batches(
            self.train_manifest,
            batch_size=self.cfg.train.micro_batch_size,
            rank=self.rank,
            world_size=self.world,
            num_workers=d.num_workers,
            shuffle_buffer=d.shuffle_buffer,
            seed=self.cfg.run.seed,
            allow_corrupt=d.allow_corrupt,
            resume=resume,
            pin_memory=pin_memory_for(self.device),
        )

    def units(self, batch: dict[str, Any]) -> int:
        ids = batch["input_ids"]
        return int(ids.shape[0] * (ids.shape[1] - 1))

    def _split(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, labels = inputs_and_labels(batch)
        # Chat data: only masked-in (assistant) targets count, in the loss and in this count.
        valid = (labels != -100).sum().to(torch.float64)
        # One scalar all-reduce so every rank divides by the global count: averaged gradients then
        # equal the gradient of the global token mean.
        scale = comm.all_reduce_sum(valid.clone()) / comm.world_size()
        return inputs, labels, scale

    def forward(self, engine, batch: dict[str, Any]) -> StepResult:
        inputs, labels, scale = self._split(batch)
        loss, tau = engine(inputs, labels, scale)
        metrics, self.last_tau = lm_step_metrics(loss, tau, labels)
        if self.last_tau is not None:
            lo = self.cfg.loss
            metrics.update(spread_tensors(tau, "tau/", lo.tau_min, lo.tau_max, mask=self.last_tau[1]))
        return StepResult(loss, metrics)

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, engine) -> dict[str, float]:
        try:
            manifest = resolve_manifest(self.cfg.data.path, self.cfg.data.eval_split)
        except FileNotFoundError:
            return {}
        module: LMTrainModule = engine.module
        was_training = module.training
        module.eval()
        try:
            sums = torch.zeros(4, dtype=torch.float64, device=self.device)
            per_token, kept = [], 0
            stream = eval_batches(
                manifest, batch_size=self.cfg.train.micro_batch_size, rank=self.rank, world_size=self.world
            )
            limit = self.cfg.eval.max_batches
            for i, (batch, real) in enumerate(lockstep(iter(stream), self.device)):
                if limit and i >= limit:  # every rank has the same limit, so lockstep holds
                    break
                inputs, labels = inputs_and_labels(batch)
                batch_sums, tokens = module(
                    inputs.to(self.device), labels.to(self.device), None, eval_sums=True
                )
                if real:
                    sums += batch_sums
                    if kept < MAX_TAU_TOKENS and tokens.numel():
                        per_token.append(tokens[: MAX_TAU_TOKENS - kept].cpu())
                        kept += per_token[-1].shape[0]
            sums = comm.all_reduce_sum(sums)
            tau_metrics = self._tau_metrics(per_token) if module.tempnet is not None else {}
        finally:
            module.train(was_training)
        n = max(1.0, float(sums[3]))
        results = {
            "eval/ppl": perplexity(float(sums[0]), int(sums[3])),
            "eval/token_acc": float(sums[2]) / n,
            "eval/loss_ce": float(sums[0]) / n,
            "eval/tokens": float(sums[3]),
        }
        if module.tempnet is not None:
            results["eval/ppl_tempnet"] = perplexity(float(sums[1]), int(sums[3]))
        return results | tau_metrics

    def _tau_metrics(self, per_token: list[torch.Tensor]) -> dict[str, float]:
        """Held-out τ spread and Spearman's correlation of a token's τ with the predictive entropy
        of its logits and with its target token's frequency among the held-out tokens."""
        rows = torch.cat(per_token) if per_token else torch.zeros(0, 3, dtype=torch.float64)
        rows = gather_rows(rows.to(self.device)).cpu()
        if rows.shape[0] < 2:
            return {}
        tau, entropy, target = rows[:, 0], rows[:, 1], rows[:, 2].long()
        counts = torch.bincount(target).double()
        lo = self.cfg.loss
        out = {f"eval/{k}": v for k, v in spread_metrics(tau, "tau", lo.tau_min, lo.tau_max).items()}
        out["eval/tau_entropy_spearman"] = spearman(tau, entropy)
        out["eval/tau_freq_spearman"] = spearman(tau, counts[target])
        return {k: v for k, v in out.items() if v == v}  # NaN: undefined (constant τ)

    def tau_prefixes(self) -> list[str]:
        return ["tau/"] if self.module.tempnet is not None else []

    def tau_samples(self) -> tuple[dict[str, torch.Tensor], str, str]:
        taus = {}
        if self.last_tau is not None:
            tau, counted = self.last_tau
            taus["τ"] = tau[counted].cpu()
        return taus, "τ per token (last training batch)", "tokens"
