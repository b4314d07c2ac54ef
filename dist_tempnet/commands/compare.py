"""`dist-tempnet compare`: a table (mean ± std over seeds) and plots of MLflow runs."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from dist_tempnet.reporting.compare import (
    COMPARISON_TAG,
    CompareError,
    compare,
    log_comparison,
    make_client,
    select_runs,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare MLflow runs: table, mean ± std over seeds, plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sel = p.add_argument_group("which runs (default: every run of experiment 'dist_tempnet')")
    sel.add_argument("--experiment", "-e", default=None, help="MLflow experiment name")
    sel.add_argument(
        "--run-ids",
        nargs="+",
        default=(),
        metavar="ID",
        help="run ids; a sweep's parent run id stands for all its child runs",
    )
    sel.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.method = 'clip'\"")
    sel.add_argument("--max-runs", type=int, default=200)
    p.add_argument(
        "--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db"
    )
    p.add_argument(
        "--out", "-o", type=Path, default=None, help="write table.csv, table.md, groups.csv and PNGs here"
    )
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument(
        "--log-to-mlflow",
        action="store_true",
        help=f"log the outputs as artifacts of a new run tagged {COMPARISON_TAG} (written to a temp dir "
        "when --out is not given)",
    )
    p.set_defaults(fn=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    try:
        client, uri = make_client(args.tracking_uri)
        experiment = args.experiment
        if not experiment and not args.run_ids and not args.filter:
            from dist_tempnet.config import MLflowConfig

            experiment = MLflowConfig().experiment
        runs = select_runs(client, experiment, args.run_ids, args.filter, args.max_runs)
    except CompareError as exc:
        print(f"dist-tempnet compare: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:  # e.g. a malformed --filter
        print(f"dist-tempnet compare: MLflow refused the query: {exc.message}", file=sys.stderr)
        return 2
    if not runs:
        print("dist-tempnet compare: no runs matched", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="dist-tempnet-compare-") as tmp:
        out = args.out or (Path(tmp) if args.log_to_mlflow else None)
        comparison = compare(client, runs, out, plots=not args.no_plots)
        print(comparison.text())
        if args.out:
            print(
                f"\nwrote {len(comparison.files)} files to {args.out}: "
                + ", ".join(p.name for p in comparison.files)
            )
        if args.log_to_mlflow:
            run_id = log_comparison(client, comparison, out, experiment if args.experiment else None)
            print(f"comparison logged to MLflow run {run_id} ({uri})")
    return 0
