"""`dist-tempnet eval --checkpoint DIR`: evaluate a training checkpoint in this process.

The checkpoint's `meta.json` carries the resolved training config, so the task (CLIP or LM) is
rebuilt exactly as trained; only the weights are loaded (no optimizer state, no DRO state). The
evaluation is the task's own (`task.evaluate(engine)`): zero-shot accuracy and image↔text
recall@1/5/10 for CLIP, perplexity and token accuracy for LMs. `--data` evaluates on other shards
with the training tokenizer; `--log-to-mlflow` logs the numbers to the training run (its id is in
meta.json) or to a new run linked to it by tag.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dist_tempnet.config import ConfigError
from dist_tempnet.runtime.evaluation import (
    EVAL_OF_TAG,
    EvalError,
    EvalResult,
    check_run_exists,
    evaluate_checkpoint,
    log_results,
    resolve_checkpoint_dir,
)
from dist_tempnet.runtime.storage import StorageError, local_checkpoint


def format_results(result: EvalResult) -> str:
    width = max(len(k) for k in result.metrics)
    lines = [f"checkpoint {result.checkpoint} (step {result.step})"]
    lines += [f"  {k.ljust(width)}  {v:.4f}" for k, v in sorted(result.metrics.items())]
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a training checkpoint (zero-shot/retrieval or perplexity)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint directory (meta.json, deepspeed/, COMPLETE), or a directory holding step_* ones; "
        "local or on an object store (s3://bucket/prefix/...)",
    )
    p.add_argument(
        "--data", default=None, help="dataset directory to evaluate on (default: the training data)"
    )
    p.add_argument("--split", default=None, help="eval split name (default: the config's data.eval_split)")
    p.add_argument("--max-batches", type=int, default=None, help="0: the whole split (default: as trained)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="eval batch size (default: train.micro_batch_size)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the metrics to this JSON file")
    p.add_argument(
        "--log-to-mlflow",
        action="store_true",
        help="log the metrics to the training run (or --run-id, or a --new-run linked by tag)",
    )
    p.add_argument(
        "--run-id", default=None, help="MLflow run to log to (default: mlflow_run_id in meta.json)"
    )
    p.add_argument(
        "--new-run", action="store_true", help=f"log to a new run tagged {EVAL_OF_TAG}=<training run>"
    )
    p.add_argument(
        "--tracking-uri",
        default="",
        help="default: the training config's, else $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db",
    )
    p.set_defaults(fn=cmd_eval)


def _tracking_uri(args: argparse.Namespace, ckpt: Path) -> str:
    from dist_tempnet.runtime.checkpoint import read_meta
    from dist_tempnet.runtime.tracking import resolve_tracking_uri

    trained_with = read_meta(ckpt).get("config", {}).get("mlflow", {}).get("tracking_uri", "")
    return resolve_tracking_uri(args.tracking_uri or trained_with)


def _preflight_mlflow(args: argparse.Namespace) -> str:
    """Check the MLflow target before spending minutes on evaluation."""
    from dist_tempnet.runtime.checkpoint import read_meta

    ckpt = resolve_checkpoint_dir(args.checkpoint)
    uri = _tracking_uri(args, ckpt)
    run_id = args.run_id or ("" if args.new_run else read_meta(ckpt).get("mlflow_run_id", ""))
    if run_id and not args.new_run:
        check_run_exists(uri, run_id)
    return uri


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        args.checkpoint = local_checkpoint(args.checkpoint)
        uri = _preflight_mlflow(args) if args.log_to_mlflow else ""
        result = evaluate_checkpoint(
            args.checkpoint, args.data, args.split, args.max_batches, args.batch_size
        )
        print(format_results(result))
        if args.json:
            args.json.write_text(
                json.dumps(
                    {"checkpoint": str(result.checkpoint), "step": result.step, "metrics": result.metrics},
                    indent=1,
                )
            )
        if args.log_to_mlflow:
            run_id = log_results(result, uri, args.run_id, args.new_run, args.data)
            print(f"logged to MLflow run {run_id} ({uri})")
    except (EvalError, ConfigError, StorageError) as exc:
        print(f"dist-tempnet eval: {exc}", file=sys.stderr)
        return 2
    return 0
