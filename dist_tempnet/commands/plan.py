"""`dist-tempnet plan --config FILE --gpus N --gpu-mem GB`: will it fit, before launching."""

from __future__ import annotations

import argparse

from dist_tempnet.config import load_config
from dist_tempnet.driver.plan import format_plan, make_plan


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    gpus = args.gpus if args.gpus is not None else cfg.ray.num_workers
    plan = make_plan(cfg, gpus, args.gpu_mem, num_samples=args.num_samples, vocab_size=args.vocab_size)
    print(format_plan(plan, args.config or ""))
    return 0 if plan.feasible else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="estimate per-GPU memory and communication of a config; exit 1 if it cannot fit",
        description="Estimate per-GPU memory (ZeRO model states, activations, loss buffers, DRO state) and "
        "per-step communication; exits 1 with the reason when the config cannot run as given.",
    )
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the embedded tiny CLIP job)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: ray.num_workers)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="training set size for the DRO state (default: the local dataset manifest)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size when no tokenizer is reachable from here",
    )
    p.set_defaults(fn=cmd_plan)
