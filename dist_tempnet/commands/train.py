"""`dist-tempnet train`: run a training job (Ray workers by default, or in this process)."""

from __future__ import annotations

import argparse
import logging

from dist_tempnet.config import ConfigError, load_config

logger = logging.getLogger("dist_tempnet")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the embedded tiny CLIP job)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 ray.num_workers=2")


def _override_value(overrides: list[str], key: str) -> str:
    values = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == key]
    return values[-1] if values else ""


def cmd_train(args: argparse.Namespace) -> int:
    from dist_tempnet.driver.launcher import print_summary, run_training
    from dist_tempnet.driver.resume import config_for_resume, resolve_resume

    resume_from = None
    if args.no_ray:
        # One worker in this process: validate (batch divisibility, accumulation) for that world.
        args.overrides = [*args.overrides, "ray.num_workers=1"]
    if args.resume:
        if args.config:
            raise ConfigError(
                "--resume continues with the checkpoint's own config: pass changes as overrides "
                "(e.g. train.steps=2000), not --config"
            )
        resume_from = resolve_resume(args.resume, _override_value(args.overrides, "mlflow.tracking_uri"))
        cfg = config_for_resume(resume_from, args.overrides)
        logger.info("resuming from %s", resume_from)
    else:
        cfg = load_config(args.config, args.overrides)
    summary = run_training(cfg, use_ray=not args.no_ray, resume_from=resume_from)
    print_summary(summary)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train with Ray + DeepSpeed, tracked in MLflow")
    add_config_args(p)
    p.add_argument(
        "--no-ray",
        action="store_true",
        help="run in this process (one rank, or under torchrun) instead of Ray workers",
    )
    p.add_argument(
        "--resume",
        default="",
        metavar="RUN_DIR_OR_MLFLOW_RUN",
        help="continue a stopped or finished run: a checkpoint directory, a run directory "
        "(<output_dir>/ray/<name>: its latest complete checkpoint) or an MLflow run id (its checkpoint_uri "
        "tag); the checkpoint's config is used, overrides apply on top (e.g. train.steps=2000)",
    )
    p.set_defaults(fn=cmd_train)
