"""`dist-tempnet` command line: train | make-shards | eval | compare | generate | export | plan."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from dist_tempnet.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the embedded tiny CLIP job)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 ray.num_workers=2")


def _override_value(overrides: list[str], key: str) -> str:
    values = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == key]
    return values[-1] if values else ""


def cmd_train(args: argparse.Namespace) -> int:
    from dist_tempnet.launcher import config_for_resume, print_summary, run_training

    resume_from = None
    if args.resume:
        if args.config:
            raise ConfigError(
                "--resume continues with the checkpoint's own config: pass changes as overrides "
                "(e.g. train.steps=2000), not --config"
            )
        from dist_tempnet.checkpoint import resolve_resume

        resume_from = resolve_resume(args.resume, _override_value(args.overrides, "mlflow.tracking_uri"))
        cfg = config_for_resume(resume_from, args.overrides)
        print(f"[dist-tempnet] resuming from {resume_from}", flush=True)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.no_ray:
        cfg.ray.num_workers = 1
    summary = run_training(cfg, use_ray=not args.no_ray, resume_from=resume_from)
    print_summary(summary)
    return 0


def cmd_make_shards(args: argparse.Namespace) -> int:
    from dist_tempnet import data

    if args.text:
        if not args.tokenizer:
            raise SystemExit(
                "make-shards --text needs --tokenizer DIR (a local Hugging Face tokenizer directory)"
            )
        out = data.make_token_shards(
            args.text, args.tokenizer, args.out, seq_len=args.seq_len, overwrite=args.overwrite
        )
    elif args.kind == "text":
        out = data.make_demo_text_dataset(
            args.out, seq_len=args.seq_len, seed=args.seed, overwrite=args.overwrite
        )
    else:
        out = data.make_demo_clip_dataset(
            args.out,
            num_train=args.num_train,
            num_eval=args.num_eval,
            image_size=args.image_size,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    print(f"shards written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-tempnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with Ray + DeepSpeed, tracked in MLflow")
    _add_config_args(p)
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

    p = sub.add_parser("make-shards", help="write webdataset shards (demo CLIP/text data or your text files)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--kind", choices=("clip", "text"), default="clip", help="which demo dataset")
    p.add_argument("--text", nargs="*", default=None, help="text files to tokenize into token shards")
    p.add_argument("--tokenizer", default=None, help="local HF tokenizer dir (with --text)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--num-train", type=int, default=4096)
    p.add_argument("--num-eval", type=int, default=512)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_make_shards)
    for register in _extra_commands():
        register(sub)
    return parser


# Commands that live in their own modules; each module defines `register(subparsers)`.
EXTRA_COMMAND_MODULES = (
    "dist_tempnet.sweep",
    "dist_tempnet.compare",
    "dist_tempnet.eval_cli",
    "dist_tempnet.generate",
    "dist_tempnet.export",
    "dist_tempnet.plan",
    "dist_tempnet.submit",
)


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    registrars = []
    for module_name in EXTRA_COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        registrars.append(module.register)
    return registrars


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args) or 0
    except ConfigError as exc:
        print(f"dist-tempnet: config error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"dist-tempnet: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
