"""`python -m dist_tempnet.train`: one rank of the training loop without Ray.

Launch it once per rank (torchrun, or by hand with RANK/WORLD_SIZE/MASTER_* set); with none of
those set it trains as a world of one. MLflow is used when importable and enabled. This is how the
loop runs on a GPU box that has no Ray, webdataset-free benchmarks aside.
"""

from __future__ import annotations

import argparse
import logging
import os

from dist_tempnet.config import load_config
from dist_tempnet.data.prepare import absolutize_paths
from dist_tempnet.runtime.logs import configure_logging
from dist_tempnet.runtime.spec import WorkerSpec
from dist_tempnet.runtime.trainer import train_worker

logger = logging.getLogger("dist_tempnet")


def _terminate_run(spec: WorkerSpec, status: str) -> None:
    """Without Ray there is no driver to close the MLflow run: rank 0 does."""
    if spec.mlflow_run_id and int(os.environ.get("RANK", "0")) == 0:
        from dist_tempnet.config import config_from_dict
        from dist_tempnet.runtime.tracking import Tracker, spool_path

        spool = spool_path(config_from_dict(spec.config))
        tracker = Tracker(spec.tracking_uri, spec.mlflow_run_id, spool=spool)
        tracker.terminate(status, status.lower())
        if tracker.not_recorded():
            logger.warning(tracker.not_recorded())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dist_tempnet.train")
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    configure_logging(int(os.environ.get("RANK", "0")))
    cfg = load_config(args.config, args.overrides)
    absolutize_paths(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    spec = WorkerSpec(cfg.to_dict(), standalone=True)
    if cfg.mlflow.enabled and int(os.environ.get("RANK", "0")) == 0:
        try:
            from dist_tempnet.runtime.tracking import start_run

            spec.tracking_uri, spec.mlflow_run_id = start_run(cfg, world)
        except ImportError as exc:
            logger.warning("MLflow not available (%s); tracking disabled", exc)
    try:
        final = train_worker(spec)
    except BaseException:
        _terminate_run(spec, "FAILED")
        raise
    _terminate_run(spec, "FINISHED")
    if int(os.environ.get("RANK", "0")) == 0:
        print({k: round(v, 5) for k, v in final.items()})
