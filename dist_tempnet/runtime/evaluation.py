"""Evaluating a training checkpoint or an exported model in this process (`dist-tempnet eval`).

The checkpoint's `meta.json` carries the resolved training config, so the task is rebuilt exactly as
trained and only the weights are loaded (no optimizer or DRO state); the metrics are the task's own
evaluation, plus the standard CLIP benchmarks or lm-evaluation-harness when asked for. Results can
be logged to the training's MLflow run or to a new run linked to it by tag.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_tempnet.config import Config, config_from_dict
from dist_tempnet.runtime.storage import local_checkpoint

EVAL_OF_TAG = "dist_tempnet.eval_of_run"


class EvalError(RuntimeError):
    """The evaluation cannot start or its data cannot be read; the message says what to fix."""


@dataclass
class EvalResult:
    checkpoint: Path
    step: int
    metrics: dict[str, float]
    source_run_id: str = ""
    logged_run_id: str = ""
    config: Config | None = field(default=None, repr=False)
    task: Any = field(default=None, repr=False)  # kept to log the task's artifacts to a new run


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint and its config


def _is_complete(path: Path) -> bool:
    from dist_tempnet.runtime.checkpoint import COMPLETE

    return (path / COMPLETE).is_file() and (path / "meta.json").is_file()


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A complete checkpoint directory, or the newest complete `step_*` directory below `path`
    (so a run's checkpoint root or Ray storage directory works too); a URI is copied here first."""
    path = local_checkpoint(path)
    if not path.exists():
        raise EvalError(f"checkpoint '{path}' does not exist")
    if _is_complete(path):
        return path
    candidates = sorted(
        (p for p in path.rglob("step_*") if p.is_dir() and _is_complete(p)), key=lambda p: p.name
    )
    if candidates:
        return candidates[-1]
    raise EvalError(
        f"checkpoint '{path}' is not a complete checkpoint (no COMPLETE marker and meta.json) and holds no "
        "complete step_* checkpoint below it"
    )


def eval_config(
    meta: dict[str, Any], data: str | None, split: str | None, max_batches: int | None, batch_size: int | None
) -> Config:
    """The training config, adapted to one process and the requested eval data."""
    if "config" not in meta:
        raise EvalError("meta.json has no 'config': this checkpoint was not written by dist-tempnet training")
    cfg = config_from_dict(meta["config"])
    cfg.ray.num_workers = 1
    if batch_size:
        cfg.train.micro_batch_size = batch_size
    # One rank, no accumulation: DeepSpeed checks global = micro × world × accumulation.
    cfg.train.global_batch_size = cfg.train.micro_batch_size
    if split:
        cfg.data.eval_split = split
    if max_batches is not None:
        cfg.eval.max_batches = max_batches
    cfg.mlflow.enabled = False
    return cfg


def _check_eval_data(path: str, split: str) -> None:
    """Fail before any model is built when there is nothing to evaluate on (the task would skip quietly)."""
    from dist_tempnet.data import resolve_manifest

    try:
        resolve_manifest(path, split)
    except FileNotFoundError as exc:
        raise EvalError(f"no eval split '{split}' under '{path}': {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Progress bars


def progress(iterable: Any, desc: str, total: int | None = None) -> Any:
    """A tqdm bar on an interactive terminal only: logs and CI output stay clean."""
    from tqdm import tqdm

    if total is None:
        with contextlib.suppress(TypeError):
            total = len(iterable)
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not sys.stderr.isatty(), leave=False)


@contextlib.contextmanager
def eval_progress(task: Any, desc: str) -> Iterator[None]:
    """Show a bar over the task's eval batches.

    The eval loops live in the task modules and take their stream from the module-level
    `eval_batches`; wrapping that name for the duration of one evaluation gives every task a
    bar without a progress parameter threaded through them.
    """
    module = sys.modules.get(type(task).__module__)
    original = getattr(module, "eval_batches", None)
    if module is None or original is None:
        yield
        return

    def with_bar(*args: Any, **kwargs: Any) -> Any:
        return progress(original(*args, **kwargs), desc)

    module.eval_batches = with_bar
    try:
        yield
    finally:
        module.eval_batches = original


# ---------------------------------------------------------------------------------------------
# Model and weights


def _load_zero3_weights(module: Any, ds_dir: Path, tag: str) -> None:
    # ZeRO-3 shards parameters by world size; consolidate to a full fp32 state dict so that one
    # process can load a checkpoint written by any number of workers.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dist_tempnet.runtime.checkpoint import weights_only_loads

    with weights_only_loads():
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "dro_state" not in k]:
        raise EvalError(
            f"checkpoint {ds_dir}/{tag} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def build_and_load(cfg: Config, ckpt: Path, meta: dict[str, Any]):
    """(task, engine) for one process with the checkpoint's weights loaded."""
    from dist_tempnet.runtime.checkpoint import verify_checkpoint, weights_only_loads
    from dist_tempnet.runtime.engine import build_engine
    from dist_tempnet.runtime.trainer import init_distributed, seed_everything
    from dist_tempnet.tasks import build_task

    verify_checkpoint(ckpt)  # every file's SHA-256 as saved, before anything is built or loaded
    device = init_distributed()
    seed_everything(cfg.run.seed)
    task = build_task(cfg, 0, 1, device)
    ds_dir, tag = ckpt / "deepspeed", meta["tag"]
    zero3 = cfg.deepspeed.zero_stage == 3
    if zero3:
        _load_zero3_weights(task.module, ds_dir, tag)
        cfg.deepspeed.zero_stage = 0  # one process: nothing to partition
    engine = build_engine(task.module, task.param_groups(), cfg)
    if not zero3:
        # Under ZeRO-0/1/2 the full module weights sit in mp_rank_00_model_states.pt whatever the
        # world size was; optimizer shards are per rank and not needed here.
        with weights_only_loads():
            path, _ = engine.load_checkpoint(
                str(ds_dir),
                tag=tag,
                load_module_only=True,
                load_optimizer_states=False,
                load_lr_scheduler_states=False,
            )
        if path is None:
            raise EvalError(f"checkpoint '{ckpt}': DeepSpeed found no weights under deepspeed/{tag}")
    return task, engine


def _corrupt_data_errors() -> tuple[type[BaseException], ...]:
    from dist_tempnet.data import CorruptShardError, ManifestError

    return CorruptShardError, ManifestError


def apply_benchmarks(cfg: Config, benchmarks: dict[str, Any] | None) -> bool:
    """Set the standard-benchmark keys (``eval.zero_shot_path``, ...) given on the command line;
    returns whether any benchmark is configured (then the data's own eval split is optional)."""
    for key, value in (benchmarks or {}).items():
        if value is None:
            continue
        if not hasattr(cfg.eval, key):
            raise EvalError(f"unknown eval setting {key!r}")
        local = key.endswith(("_path", "_images")) and "://" not in str(value)
        setattr(cfg.eval, key, str(Path(value).resolve()) if local else value)
    return bool(cfg.eval.zero_shot_path or cfg.eval.retrieval_path)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | None = None,
    split: str | None = None,
    max_batches: int | None = None,
    batch_size: int | None = None,
    benchmarks: dict[str, Any] | None = None,
) -> EvalResult:
    """Evaluate one checkpoint in this process (world size 1); see the module docstring.

    ``benchmarks``: EvalConfig keys (zero_shot_path, classnames, templates, retrieval_path, ...)
    overriding the training config's; with one set, the data's own eval split is optional."""
    from dist_tempnet.runtime.checkpoint import read_meta

    ckpt = resolve_checkpoint_dir(checkpoint)
    meta = read_meta(ckpt)
    cfg = eval_config(meta, data, split, max_batches, batch_size)
    if not apply_benchmarks(cfg, benchmarks) or data:
        _check_eval_data(data or cfg.data.path, cfg.data.eval_split)
    task, engine = _build_for_data(cfg, ckpt, meta, data)
    try:
        with eval_progress(task, f"eval {cfg.data.path}/{cfg.data.eval_split}"):
            metrics = task.evaluate(engine)
    except (*_corrupt_data_errors(), FileNotFoundError, ValueError) as exc:
        raise EvalError(f"cannot evaluate on '{cfg.data.path}' (split {cfg.data.eval_split}): {exc}") from exc
    if not metrics:
        raise EvalError(
            f"the {cfg.run.task} task produced no metrics for '{cfg.data.path}' (split {cfg.data.eval_split})"
        )
    return EvalResult(
        ckpt, int(meta.get("step", 0)), metrics, meta.get("mlflow_run_id") or "", config=cfg, task=task
    )


def _build_for_data(cfg: Config, ckpt: Path, meta: dict[str, Any], data: str | None):
    """Build with the training data (its train split fixes the tokenizer and the DRO state size),
    then point evaluation at `data`. If the training data is gone, `data` must provide both."""
    from dist_tempnet.data import resolve_manifest

    try:
        resolve_manifest(cfg.data.path, cfg.data.train_split)
    except FileNotFoundError as exc:
        if not data:
            raise EvalError(
                f"the training data '{cfg.data.path}' is not available (its train split holds the tokenizer "
                "and sample count the model was built with); pass --data DIR"
            ) from exc
        cfg.data.path = str(Path(data).resolve())
    task, engine = build_and_load(cfg, ckpt, meta)
    if data:
        cfg.data.path = str(Path(data).resolve())  # the task reads cfg.data.path when it evaluates
    return task, engine


def evaluate_exported(
    model_dir: str | Path, benchmarks: dict[str, Any], batch_size: int = 64, num_workers: int = 0
) -> EvalResult:
    """Run the standard CLIP benchmarks on a model directory written by `dist-tempnet export`
    (transformers CLIPModel + tokenizer), without DeepSpeed."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, CLIPModel

    from dist_tempnet.data.collate import normalize_pixels
    from dist_tempnet.models.clip import encode_images, encode_texts
    from dist_tempnet.tasks.clip_benchmarks import BenchmarkContext, run_benchmarks

    model_dir = Path(model_dir)
    info_file = model_dir / "dist_tempnet_export.json"
    if not info_file.is_file():
        raise EvalError(f"{model_dir}: not written by `dist-tempnet export` (no {info_file.name})")
    info = json.loads(info_file.read_text())
    if info.get("task") != "clip":
        raise EvalError(
            f"{model_dir}: --model evaluates exported CLIP models; this one is {info.get('task')!r}"
        )
    cfg = Config()
    cfg.run.name = model_dir.name
    cfg.mlflow.enabled = False
    if not apply_benchmarks(cfg, benchmarks):
        raise EvalError("--model needs a benchmark: --zero-shot PATH and/or --retrieval PATH")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = CLIPModel.from_pretrained(str(model_dir)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_len = int(model.config.text_config.max_position_embeddings)

    def images(pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(encode_images(model, normalize_pixels(pixels)).float(), dim=-1)

    def texts(captions: list[str]) -> torch.Tensor:
        enc = tokenizer(
            captions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        return F.normalize(encode_texts(model, ids, mask).float(), dim=-1)

    ctx = BenchmarkContext(
        images, texts, int(model.config.vision_config.image_size), batch_size, num_workers, device,
        tokenizer=tokenizer, max_text_len=max_len,
    )  # fmt: skip
    with torch.no_grad():
        metrics = run_benchmarks(ctx, cfg.eval)
    return EvalResult(
        model_dir, int(info.get("step", 0)), metrics, info.get("mlflow_run_id") or "", config=cfg
    )


# ---------------------------------------------------------------------------------------------
# MLflow


def _metric_prefix(data: str | None) -> str:
    """`eval/...` for the training's own eval split; `eval_<dataset dir>/...` for other shards, so
    results on another dataset never mix with the training run's own eval curve."""
    if not data:
        return ""
    name = "".join(c if c.isalnum() or c in "_-." else "_" for c in Path(data).resolve().name)
    return f"eval_{name}"


def _renamed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    if not prefix:
        return dict(metrics)
    return {prefix + "/" + k.removeprefix("eval/"): v for k, v in metrics.items()}


def check_run_exists(tracking_uri: str, run_id: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as exc:
        raise EvalError(
            f"MLflow run {run_id!r} not found at {tracking_uri} (pass --tracking-uri, or "
            "--new-run to log to a new run)"
        ) from exc


def _new_linked_run(client, cfg: Config, source_run_id: str, ckpt: Path) -> str:
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.mlflow.experiment)
    tags = {
        "mlflow.runName": f"eval-{cfg.mlflow.run_name or cfg.run.name}",
        "task": cfg.run.task,
        "method": cfg.loss.name,
        "model": cfg.model.pretrained or cfg.model.preset,
        "world_size": "1",
        "zero_stage": str(cfg.deepspeed.zero_stage),
        "checkpoint_uri": str(ckpt),
        "mlflow.source.name": "dist-tempnet eval",
    }
    if source_run_id:
        tags[EVAL_OF_TAG] = source_run_id
    return client.create_run(exp_id, tags=tags).info.run_id


def log_results(
    result: EvalResult, tracking_uri: str, run_id: str | None, new_run: bool, data: str | None
) -> str:
    """Log to `run_id` (default: the training run) or to a new run linked by tag; returns the run id."""
    from mlflow.tracking import MlflowClient

    from dist_tempnet.runtime.tracking import Tracker, log_tau_histogram

    client = MlflowClient(tracking_uri=tracking_uri)
    cfg = result.config
    target = "" if new_run else (run_id or result.source_run_id)
    created = not target
    if created:
        target = _new_linked_run(client, cfg, result.source_run_id, result.checkpoint)
    tracker = Tracker(tracking_uri, target)
    prefix = _metric_prefix(data)
    tracker.log_metrics(_renamed(result.metrics, prefix), result.step)
    tag_prefix = f"{prefix or 'eval'}."
    tracker.set_tags(
        {
            f"{tag_prefix}checkpoint": str(result.checkpoint),
            f"{tag_prefix}data": f"{cfg.data.path}:{cfg.data.eval_split}",
        }
    )
    if created:
        if result.task is not None:
            log_tau_histogram(tracker, *result.task.tau_samples())
        tracker.terminate("FINISHED")
    else:
        tracker.flush()
    if tracker.failures:
        raise EvalError(f"logging to MLflow run {target} failed (see the warning above)")
    return target


# ---------------------------------------------------------------------------------------------
# CLI


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness on an export or a checkpoint


@dataclass
class LMEvalResult:
    model_dir: Path
    metrics: dict[str, float]
    step: int = 0
    source_run_id: str = ""  # the training run the model came from, when known
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _export_info(model_dir: Path) -> dict[str, Any]:
    info = model_dir / "dist_tempnet_export.json"
    import json

    return json.loads(info.read_text()) if info.is_file() else {}


def lm_eval_model(
    model: str | Path | None,
    checkpoint: str | Path | None,
    tasks: list[str],
    *,
    include_path: str | None = None,
    use_tempnet: bool = True,
    limit: float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> LMEvalResult:
    """Run lm-eval (`dist_tempnet` model) on an export, or on a checkpoint exported to a temporary dir."""
    import tempfile

    from dist_tempnet.runtime.checkpoint import read_meta
    from dist_tempnet.runtime.export import export_checkpoint
    from dist_tempnet.runtime.lm_eval_harness import flatten_results, run_lm_eval

    if (model is None) == (checkpoint is None):
        raise EvalError("--lm-eval needs exactly one of --model EXPORT_DIR or --checkpoint DIR")
    with tempfile.TemporaryDirectory(prefix="dt-lm-eval-") as tmp:
        if checkpoint is not None:
            ckpt = resolve_checkpoint_dir(checkpoint)
            meta = read_meta(ckpt)
            if meta.get("config", {}).get("run", {}).get("task") != "lm":
                raise EvalError(f"--lm-eval evaluates language models; checkpoint '{ckpt}' is not an LM run")
            model_dir = export_checkpoint(ckpt, Path(tmp) / "export")
            step, run_id = int(meta.get("step", 0)), meta.get("mlflow_run_id") or ""
        else:
            model_dir = Path(model).expanduser()
            if not (model_dir / "config.json").is_file():
                raise EvalError(f"--model: '{model_dir}' is not an exported model directory (no config.json)")
            info = _export_info(model_dir)
            step, run_id = int(info.get("step", 0)), info.get("mlflow_run_id", "")
        try:
            raw = run_lm_eval(
                model_dir, tasks, include_path=include_path, use_tempnet=use_tempnet, limit=limit,
                batch_size=batch_size, device=device,
            )  # fmt: skip
        except ValueError as exc:
            raise EvalError(str(exc)) from exc
    prefix = "lm_eval" if use_tempnet else "lm_eval_no_tempnet"
    result_dir = Path(model) if model is not None else Path(checkpoint)
    return LMEvalResult(result_dir, flatten_results(raw, prefix), step, run_id, raw)


def log_lm_eval(
    result: LMEvalResult, tracking_uri: str, run_id: str | None, new_run: bool, tasks: str
) -> str:
    """Log lm-eval metrics to `run_id` (default: the model's training run) or a new run; returns its id."""
    from mlflow.tracking import MlflowClient

    from dist_tempnet.runtime.tracking import Tracker

    client = MlflowClient(tracking_uri=tracking_uri)
    target = "" if new_run else (run_id or result.source_run_id)
    created = not target
    if created:
        exp = client.get_experiment_by_name("dist_tempnet-lm-eval")
        exp_id = exp.experiment_id if exp else client.create_experiment("dist_tempnet-lm-eval")
        tags = {"mlflow.runName": f"lm-eval-{result.model_dir.name}"}
        tags["mlflow.source.name"] = "dist-tempnet eval"
        if result.source_run_id:
            tags[EVAL_OF_TAG] = result.source_run_id
        target = client.create_run(exp_id, tags=tags).info.run_id
    else:
        check_run_exists(tracking_uri, target)
    tracker = Tracker(tracking_uri, target)
    tracker.log_metrics(result.metrics, result.step)
    tracker.set_tags({"lm_eval.tasks": tasks, "lm_eval.model": str(result.model_dir)})
    if created:
        tracker.terminate("FINISHED")
    else:
        tracker.flush()
    if tracker.failures:
        raise EvalError(f"logging to MLflow run {target} failed (see the warning above)")
    return target
