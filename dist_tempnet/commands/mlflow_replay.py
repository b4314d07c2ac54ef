"""`dist-tempnet mlflow-replay`: send what a run could not log to MLflow (its spool) now."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dist_tempnet.runtime.tracking import SPOOL_NAME, Spool, replay_spool

logger = logging.getLogger("dist_tempnet")


def cmd_mlflow_replay(args: argparse.Namespace) -> int:
    path = Path(args.spool)
    if path.is_dir():
        path = path / SPOOL_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no MLflow spool at {path} (a run keeps one at <run.output_dir>/<run.name>/{SPOOL_NAME} "
            "only while something is not recorded)"
        )
    try:
        sent, left = replay_spool(path, args.tracking_uri)
    except Exception as exc:  # noqa: BLE001 - one clear line, the spool is kept as it was
        reason = f"{type(exc).__name__}: {str(exc)[:300]}"
        logger.error(f"MLflow replay stopped ({reason}); {Spool(path).describe()} still kept in {path}")
        return 1
    runs = Spool(path).run_ids()
    created = f"; runs created: {', '.join(runs.values())}" if runs else ""
    logger.info(f"MLflow replay: {sent} records sent, {left} left in {path}{created}")
    return 0 if left == 0 else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mlflow-replay",
        help="send a run's spooled MLflow calls (kept while the server was unreachable)",
    )
    p.add_argument("spool", help=f"the spool file or the run directory holding {SPOOL_NAME}")
    p.add_argument(
        "--tracking-uri",
        default="",
        help="send to this MLflow instead of the tracking URI recorded with each call",
    )
    p.set_defaults(fn=cmd_mlflow_replay)
