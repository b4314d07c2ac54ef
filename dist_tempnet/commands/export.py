"""`dist-tempnet export --checkpoint DIR --out DIR`: a checkpoint (any ZeRO stage) → a transformers
model directory + tempnet.safetensors, loadable without DeepSpeed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_tempnet.runtime.checkpoint import read_meta
from dist_tempnet.runtime.evaluation import EvalError, resolve_checkpoint_dir
from dist_tempnet.runtime.export import export_checkpoint
from dist_tempnet.runtime.storage import StorageError, local_checkpoint


def cmd_export(args: argparse.Namespace) -> int:
    # The same forms `eval` accepts: a checkpoint, or a run directory (its newest complete checkpoint),
    # local or on an object store (copied here once: export and --log-to-mlflow read it).
    try:
        checkpoint = resolve_checkpoint_dir(local_checkpoint(args.checkpoint))
    except (EvalError, StorageError) as exc:
        print(f"dist-tempnet export: {exc}", file=sys.stderr)
        return 2
    out = export_checkpoint(checkpoint, args.out)
    print(f"exported {checkpoint} → {out}")
    if args.log_to_mlflow:
        meta = read_meta(checkpoint)
        run_id = args.run_id or meta.get("mlflow_run_id", "")
        if not run_id:
            raise SystemExit("--log-to-mlflow: no run id in the checkpoint; pass --run-id")
        from dist_tempnet.runtime.tracking import Tracker, resolve_tracking_uri

        tracker = Tracker(resolve_tracking_uri(args.tracking_uri or ""), run_id)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        if size <= args.max_artifact_mb * 2**20:
            tracker.log_artifact(out, "export")
        tracker.set_tags({"export_uri": str(out.resolve()), "export_bytes": size})
        print(f"logged export to MLflow run {run_id}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="consolidate a checkpoint into a transformers model dir + TempNet")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory (with meta.json) or a run directory (its newest complete checkpoint), "
        "local or s3://…",
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--log-to-mlflow", action="store_true")
    p.add_argument("--run-id", default="")
    p.add_argument("--tracking-uri", default="")
    p.add_argument(
        "--max-artifact-mb", type=float, default=200.0, help="larger exports are logged to MLflow by URI only"
    )
    p.set_defaults(fn=cmd_export)
