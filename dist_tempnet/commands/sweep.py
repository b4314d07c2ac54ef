"""`dist-tempnet sweep --config FILE --grid key=v1,v2 ...`: a grid of runs under one MLflow parent run."""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_tempnet.driver.sweep import plan_sweep, run_sweep


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of configs sequentially under one MLflow parent run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the embedded tiny CLIP job)")
    p.add_argument(
        "--grid",
        "-g",
        nargs="+",
        required=True,
        metavar="KEY=V1,V2",
        help="dotted key with comma-separated values; several keys give their cartesian product",
    )
    p.add_argument(
        "--set",
        "-s",
        dest="sets",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="overrides applied to every grid point",
    )
    p.add_argument("--name", default="", help="sweep name (default: <run.name>-sweep-<timestamp>)")
    p.add_argument(
        "--out", "-o", type=Path, default=None, help="also write the comparison tables and plots here"
    )
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed grid point")
    p.add_argument("--no-ray", action="store_true", help="train every point in this process (one rank)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the grid points, run nothing")
    p.set_defaults(fn=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    plan = plan_sweep(args.config, args.grid, args.sets, args.name)  # ConfigError → exit 2 in cli.main
    if args.dry_run:
        for point, cfg in zip(plan.points, plan.configs):
            print(f"{point.index:3d}  {point.label}  (run.name={cfg.run.name})")
        return 0
    _, results = run_sweep(plan, fail_fast=args.fail_fast, out=args.out, use_ray=not args.no_ray)
    failed = [r for r in results if r.error]
    return 1 if failed or len(results) < len(plan.points) else 0
