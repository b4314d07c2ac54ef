"""lm-evaluation-harness with TempNet's τ: the `dist_tempnet` model of lm-eval.

`TempNetHFLM` is lm-eval's `HFLM` for an exported model directory (`dist-tempnet export`) whose
logits are divided by the τ its TempNet predicts from them: for loglikelihood / multiple-choice
tasks every position's logits become z / τ(z) before lm-eval's log-softmax, and generation tasks
decode with `TempNetLogitsProcessor` (τ first, then the task's own generation settings; see
models.generation). `tempnet=false` in the model args evaluates the same export at τ = 1.

lm-eval has no plugin discovery, so its own `lm_eval` command cannot see the model. Importing this
module registers it; the `dist-tempnet-lm-eval` command is lm-eval's CLI with it registered:

    dist-tempnet-lm-eval --model dist_tempnet --model_args pretrained=EXPORT_DIR --tasks hellaswag
    python -m dist_tempnet.runtime.lm_eval_harness --model dist_tempnet ...      (the same)

`dist-tempnet eval --lm-eval TASKS --model EXPORT_DIR | --checkpoint DIR` runs it and logs the
results to MLflow. lm-eval is an optional extra: `pip install 'dist_tempnet[eval]'`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MODEL_NAME = "dist_tempnet"

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # the optional extra is missing: say how to get it
    raise ImportError(
        "lm-evaluation-harness is not installed: pip install 'dist_tempnet[eval]' (or pip install lm_eval)"
    ) from exc


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


@register_model(MODEL_NAME)
class TempNetHFLM(HFLM):
    """HFLM whose logits are z / τ(z) with the export's TempNet (τ = 1 when `tempnet=false`)."""

    def __init__(self, pretrained: str, tempnet: bool | str = True, **kwargs: Any) -> None:
        from dist_tempnet.runtime.export import load_tempnets

        super().__init__(pretrained=pretrained, **kwargs)
        self.tempnet = None
        if _as_bool(tempnet):
            net = load_tempnets(pretrained).get("lm") if Path(str(pretrained)).is_dir() else None
            if net is None:
                raise ValueError(
                    f"{MODEL_NAME}: '{pretrained}' holds no LM TempNet (tempnet_config.json): pass an "
                    "export written by `dist-tempnet export`, or tempnet=false to evaluate at τ = 1"
                )
            head_rows = self.model.get_output_embeddings().weight.shape[0]
            if net.vocab_size != head_rows:
                raise ValueError(
                    f"{MODEL_NAME}: TempNet reads {net.vocab_size} logits but the model has {head_rows}"
                )
            self.tempnet = net.to(self.device).eval()

    @torch.no_grad()
    def tau(self, logits: torch.Tensor) -> torch.Tensor:
        """τ for every position of logits [..., V] (fp32, TempNet's own precision)."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return self.tempnet(flat).reshape(logits.shape[:-1])

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        if self.tempnet is None:
            return logits
        return (logits.float() / self.tau(logits).unsqueeze(-1)).to(logits.dtype)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs: Any):
        if self.tempnet is not None:
            from transformers import LogitsProcessorList

            from dist_tempnet.models.generation import TempNetLogitsProcessor

            processors = LogitsProcessorList(generation_kwargs.pop("logits_processor", None) or [])
            processors.append(TempNetLogitsProcessor(self.tempnet, record=False))
            generation_kwargs["logits_processor"] = processors
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def flatten_results(results: dict[str, Any], prefix: str = "lm_eval") -> dict[str, float]:
    """lm-eval's {'results': {task: {'acc,none': x, 'acc_stderr,none': s, ...}}} -> flat metrics
    `prefix/task/acc` (the filter name is kept when it is not 'none')."""
    flat = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or metric == "alias":
                continue
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat


def run_lm_eval(
    model_dir: str | Path,
    tasks: list[str],
    *,
    include_path: str | None = None,
    use_tempnet: bool = True,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    device: str = "cpu",
    num_fewshot: int | None = None,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on an exported model with the `dist_tempnet` model class."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:
        # Indexing lm-eval's ~15k built-in task configs takes long; skip it when `include_path`
        # holds every requested task.
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"under {include_path} or built in" if include_path else "built in (--lm-eval-include adds)"
        raise ValueError(f"lm-eval task(s) {unknown} not found {where}")
    return simple_evaluate(
        model=MODEL_NAME,
        model_args={"pretrained": str(model_dir), "tempnet": use_tempnet, "device": device},
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        log_samples=False,
    )


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `dist_tempnet` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
