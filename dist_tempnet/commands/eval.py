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
    evaluate_exported,
    log_results,
    resolve_checkpoint_dir,
)
from dist_tempnet.runtime.storage import StorageError, local_checkpoint
from dist_tempnet.runtime.tracking import resolve_tracking_uri


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
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint directory (meta.json, deepspeed/, COMPLETE), or a directory holding step_* ones; "
        "local or on an object store (s3://bucket/prefix/...)",
    )
    which.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a model directory written by `dist-tempnet export`: CLIP benchmarks, or --lm-eval for an LM",
    )
    bench = p.add_argument_group("standard CLIP benchmarks (override the training config's eval.*)")
    bench.add_argument(
        "--zero-shot",
        dest="zero_shot_path",
        help="ImageFolder tree (root/<class>/*.jpg, e.g. ImageNet val) or shards/index with a cls field",
    )
    bench.add_argument(
        "--classnames", help="imagenet (built in) | a file of class names (default: dir names)"
    )
    bench.add_argument(
        "--templates", help="openai (80 templates, default) | simple | a file with {} templates"
    )
    bench.add_argument(
        "--retrieval",
        dest="retrieval_path",
        help="Karpathy-split JSON (Flickr30k/COCO) or multi-caption shards",
    )
    bench.add_argument("--retrieval-images", help="image root of the Karpathy JSON (default: its directory)")
    bench.add_argument("--retrieval-split", help="Karpathy split (default: test)")
    bench.add_argument("--num-workers", type=int, default=0, help="image decoding workers (--model)")
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
    g = p.add_argument_group("lm-evaluation-harness (pip install 'dist_tempnet[eval]')")
    g.add_argument(
        "--lm-eval",
        default="",
        metavar="TASKS",
        help="comma-separated lm-eval tasks, run with TempNet's τ on the logits (model `dist_tempnet`)",
    )
    g.add_argument("--lm-eval-include", default=None, help="directory of your own lm-eval task YAMLs")
    g.add_argument("--limit", type=float, default=None, help="lm-eval: documents per task (debugging)")
    g.add_argument("--no-tempnet", action="store_true", help="lm-eval at τ = 1 (the model without TempNet)")
    g.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_eval)


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from dist_tempnet.runtime.evaluation import lm_eval_model, log_lm_eval
    from dist_tempnet.runtime.tracking import resolve_tracking_uri

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    uri = ""
    if args.log_to_mlflow:
        uri = _tracking_uri(args, resolve_checkpoint_dir(args.checkpoint)) if args.checkpoint else ""
        uri = uri or resolve_tracking_uri(args.tracking_uri)
    result = lm_eval_model(
        args.model,
        args.checkpoint,
        tasks,
        include_path=args.lm_eval_include,
        use_tempnet=not args.no_tempnet,
        limit=args.limit,
        batch_size=args.batch_size or 8,
        device=args.device,
    )
    width = max(len(k) for k in result.metrics) if result.metrics else 0
    print(f"lm-eval on {result.model_dir} ({'τ = 1' if args.no_tempnet else 'with TempNet τ'})")
    print("\n".join(f"  {k.ljust(width)}  {v:.4f}" for k, v in sorted(result.metrics.items())))
    if args.json:
        payload = {"model": str(result.model_dir), "metrics": result.metrics}
        args.json.write_text(json.dumps(payload, indent=1))
    if args.log_to_mlflow:
        run_id = log_lm_eval(result, uri, args.run_id, args.new_run, ",".join(tasks))
        print(f"logged to MLflow run {run_id} ({uri})")
    return 0


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


BENCHMARK_KEYS = (
    "zero_shot_path", "classnames", "templates", "retrieval_path", "retrieval_images", "retrieval_split",
)  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> int:
    benchmarks = {key: getattr(args, key) for key in BENCHMARK_KEYS}
    try:
        if args.lm_eval:
            return cmd_lm_eval(args)
        if args.model is not None:
            result = evaluate_exported(args.model, benchmarks, args.batch_size or 64, args.num_workers)
            uri = resolve_tracking_uri(args.tracking_uri) if args.log_to_mlflow else ""
            if args.log_to_mlflow and result.source_run_id and not args.new_run:
                check_run_exists(uri, args.run_id or result.source_run_id)
        else:
            args.checkpoint = local_checkpoint(args.checkpoint)
            uri = _preflight_mlflow(args) if args.log_to_mlflow else ""
            result = evaluate_checkpoint(
                args.checkpoint, args.data, args.split, args.max_batches, args.batch_size, benchmarks
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
