"""Finding what `dist-tempnet train --resume SPEC` continues from: a checkpoint directory, a run
directory (its latest complete checkpoint) or an MLflow run id (its `checkpoint_uri` tag)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import yaml

from dist_tempnet.config import Config, ConfigError, load_config
from dist_tempnet.runtime import storage as remote
from dist_tempnet.runtime.checkpoint import COMPLETE, META, latest_checkpoint, read_meta, verify_checkpoint

logger = logging.getLogger(__name__)


def _checkpoint_in_dir(path: Path) -> Path:
    """A checkpoint directory, or the latest complete checkpoint of a run directory; its files are
    verified against their SHA-256 (CheckpointError) before any worker starts."""
    if (path / META).is_file() or (path / COMPLETE).is_file():
        verify_checkpoint(path)
        return path
    for root in (path, path / "checkpoints"):
        latest = latest_checkpoint(root)
        if latest is not None:
            verify_checkpoint(latest)
            return latest
    raise FileNotFoundError(
        f"'{path}' is neither a checkpoint (meta.json + COMPLETE) nor a run directory holding complete "
        "step_* checkpoints (a Ray run dir <output_dir>/ray/<name>, or <output_dir>/<name>/checkpoints)"
    )


def resolve_resume(spec: str, tracking_uri: str = "") -> Path:
    """`--resume` argument → checkpoint directory: a checkpoint dir, a run dir (its latest complete
    checkpoint), or an MLflow run id whose `checkpoint_uri` tag points at one of those. On an object
    store (s3://…) the checkpoint is copied to a local directory first."""
    if remote.is_uri(spec):
        return _checkpoint_in_dir(remote.local_checkpoint(spec))
    path = Path(spec).expanduser()
    if path.exists():
        return _checkpoint_in_dir(path.resolve())
    from dist_tempnet.runtime.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(spec)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
        raise FileNotFoundError(
            f"--resume {spec!r}: no such checkpoint or run directory, and not an MLflow run id in {uri} "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    target = run.data.tags.get("checkpoint_uri", "")
    if not target:
        raise FileNotFoundError(
            f"--resume {spec!r}: the MLflow run has no 'checkpoint_uri' tag (never saved)"
        )
    if remote.is_uri(target):
        resolved = _checkpoint_in_dir(remote.local_checkpoint(target))
        logger.warning(f"MLflow run {spec} → checkpoint {target} (copied to {resolved})")
        return resolved
    target_path = Path(target.removeprefix("file://"))
    if not target_path.exists():
        raise FileNotFoundError(f"--resume {spec!r}: its checkpoint_uri {target} does not exist here")
    resolved = _checkpoint_in_dir(target_path)
    logger.warning(f"MLflow run {spec} → checkpoint {resolved}")
    return resolved


def config_for_resume(checkpoint: Path, overrides: list[str] | None = None) -> Config:
    """The checkpoint's resolved config with `overrides` applied (e.g. train.steps=2000, or
    ray.num_workers=4 for an elastic resume), validated like any config."""
    meta = read_meta(Path(checkpoint))
    with tempfile.TemporaryDirectory(prefix="dist-tempnet-resume-") as tmp:
        path = Path(tmp) / f"config of {Path(checkpoint).name}.yaml"
        path.write_text(yaml.safe_dump(meta["config"], sort_keys=False))
        return load_config(path, overrides)


def run_checkpoint_dir(cfg: Config, use_ray: bool) -> Path:
    """Where a run named `run.name` keeps its checkpoints: Ray's run directory (Ray resumes a run of
    the same name and storage from it by itself), or the LocalSink's directory without Ray."""
    output = Path(cfg.run.output_dir)
    return output / "ray" / cfg.run.name if use_ray else output / cfg.run.name / "checkpoints"


def refuse_existing_run(cfg: Config, use_ray: bool) -> None:
    """A new `train` (no --resume) must not silently continue another run of the same name."""
    root = run_checkpoint_dir(cfg, use_ray)
    latest = latest_checkpoint(root)
    if latest is None:
        return
    step = read_meta(latest).get("step", "?")
    raise ConfigError(
        f"run.name={cfg.run.name!r} already exists: {root} holds checkpoints (latest: {latest.name}, step "
        f"{step}). Nothing was started. To continue that run: dist-tempnet train --resume {root} "
        f"[overrides, e.g. train.steps=...]; for a new run: choose another run.name (e.g. "
        f"run.name={cfg.run.name}-2) or another run.output_dir"
    )


# Config keys a checkpoint cannot be loaded under when they change: the model and loss shape the
# saved tensors, the ZeRO stage their partitioning.
_FIXED_ON_RESUME = (
    ("run", "task"),
    ("model", "preset"),
    ("model", "pretrained"),
    ("model", "overrides"),
    ("loss", "name"),
    ("loss", "num_prototypes"),
    ("loss", "tempnet_hidden"),
    ("deepspeed", "zero_stage"),
)


def check_resume(cfg: Config, checkpoint: Path, world_size: int) -> None:
    """Before any worker starts: the checkpoint fits the run that is to continue from it.

    The model, loss and ZeRO stage must be the checkpoint's; the world size may change (elastic
    resume: runtime.checkpoint.restore re-partitions the ZeRO state through DeepSpeed's universal
    format and the task re-shards its DRO state), which is logged."""
    meta = read_meta(checkpoint)
    saved = meta["config"]
    new = cfg.to_dict()
    differs = [
        f"{section}.{key}: checkpoint {saved.get(section, {}).get(key)!r}, this run {new[section][key]!r}"
        for section, key in _FIXED_ON_RESUME
        if saved.get(section, {}).get(key) != new[section][key]
    ]
    if differs:
        raise ConfigError(
            f"--resume {checkpoint}: this run does not fit the checkpoint; nothing was started:\n  "
            + "\n  ".join(differs)
            + "\nKeep those settings (they come from the checkpoint unless overridden), or start a new "
            "run with another run.name"
        )
    old_world = int(meta["world_size"])
    if old_world != world_size:
        logger.info(
            f"elastic resume: checkpoint saved by {old_world} worker(s), continuing on {world_size} "
            f"(ZeRO-{saved['deepspeed']['zero_stage']} state re-partitioned, DRO state re-sharded)"
        )


def steps_left(cfg: Config, checkpoint: Path) -> int:
    """Optimizer steps from the checkpoint to `train.steps` (≤ 0: nothing to train)."""
    return cfg.train.steps - int(read_meta(checkpoint)["step"])
