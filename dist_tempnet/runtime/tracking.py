"""MLflow tracking, rank 0 only, and never fatal.

The driver creates the run (so it can print its id and log the resolved config before any worker
starts); rank 0 of the workers reopens it by id and logs metrics. Tracking failures (server down,
database locked) print one warning and are buffered and retried at the next call: a run never
dies because of tracking.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from dist_tempnet.config import Config

logger = logging.getLogger(__name__)


def resolve_tracking_uri(uri: str) -> str:
    """Absolute URI for the workers: Ray runs them in throwaway working directories."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        return f"sqlite:///{Path(rel).resolve()}"
    if "://" not in uri:
        raise ValueError(
            f"mlflow.tracking_uri: {uri!r} is not a URI; use sqlite:///path/mlflow.db or http://host:5000 "
            "(MLflow 3 refuses plain file stores)"
        )
    return uri


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_name(name: str) -> str:
    """MLflow accepts alphanumerics and _ - . space : / in names; map anything else to '_'."""
    return _METRIC_NAME.sub("_", name)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


class Tracker:
    """A thin, failure-tolerant wrapper over MlflowClient bound to one run.

    `Tracker.disabled()` is a no-op stand-in for ranks other than 0 and runs without MLflow.
    """

    def __init__(
        self, tracking_uri: str, run_id: str, max_buffer: int = 100_000, backoff_s: float = 30.0
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._pending: list[Any] = []
        self._max_buffer = max_buffer
        self._warned = False
        self.failures = 0
        # After a failure, calls are skipped (metrics and tags buffered) for backoff_s, so a slow or
        # unreachable server costs one timeout per window instead of one per logging call.
        self._backoff_s = backoff_s
        self._skip_until = 0.0
        self._pending_tags: dict[str, str] = {}

    @classmethod
    def disabled(cls) -> Tracker:
        self = cls.__new__(cls)
        self.run_id = ""
        self.client = None
        self.failures = 0
        return self

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def _drop_invalid(self, exc: Exception) -> None:
        # The server rejected the values themselves: retrying would block every later metric.
        warnings.warn(f"MLflow rejected a metric batch as invalid, dropping it: {exc}", stacklevel=4)
        del self._pending[:1000]

    def _call(self, fn, *args, on_invalid=None, **kwargs) -> bool:
        if time.monotonic() < self._skip_until:
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 - tracking must never kill training
            if on_invalid is not None and getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE":
                on_invalid(exc)
                return False
            self.failures += 1
            self._skip_until = time.monotonic() + self._backoff_s
            if not self._warned:
                warnings.warn(
                    f"MLflow tracking failed ({type(exc).__name__}: {exc}); training continues, "
                    "metrics are buffered and retried",
                    stacklevel=3,
                )
                self._warned = True
            return False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(metric_name(k), float(v), now, step) for k, v in metrics.items())
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Send buffered metrics and tags; `force` ignores the failure back-off (end of training)."""
        if not self.enabled:
            return
        if force:
            self._skip_until = 0.0
        if self._pending_tags:
            self.set_tags({})
        if not self._pending:
            return
        batch = self._pending[:1000]
        if self._call(self.client.log_batch, self.run_id, metrics=batch, on_invalid=self._drop_invalid):
            del self._pending[: len(batch)]
            if self._pending:
                self.flush()
            elif self._warned:
                self._warned = False
        elif len(self._pending) > self._max_buffer:
            del self._pending[: len(self._pending) - self._max_buffer]

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Tags are kept until the server took them (the newest value of each wins)."""
        if not self.enabled:
            return
        self._pending_tags.update({k: str(v) for k, v in tags.items()})
        for k, v in list(self._pending_tags.items()):
            if not self._call(self.client.set_tag, self.run_id, k, v):
                return
            del self._pending_tags[k]

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._call(self.client.log_text, self.run_id, text, artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            self._call(self.client.log_figure, self.run_id, figure, artifact_file)

    def terminate(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.flush(force=True)
            self._call(self.client.set_terminated, self.run_id, status)


def histogram_range(values: Any) -> tuple[float, float]:
    """The x range of a histogram of `values`, never narrower than float resolution allows.

    numpy refuses 50 bins over a range of a few ulps ("Too many bins for data range"), which is
    exactly what a collapsed τ looks like; such values are shown as one spike in a readable window.
    """
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size == 0:
        return 0.0, 1.0
    low, high = float(data.min()), float(data.max())
    centre = 0.5 * (low + high)
    half = max(0.5 * (high - low), 1e-3 * abs(centre), 1e-12)
    return centre - half, centre + half


def log_tau_histogram(tracker: Tracker, taus: dict[str, Any], xlabel: str, ylabel: str) -> None:
    """Log a histogram of τ values (one series per label) as `tau_histogram.png`.

    Best-effort, like all tracking: a plotting problem is logged as a warning, never raised.
    """
    if not tracker.enabled or not taus:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        values = {label: np.asarray(tau, dtype=np.float64).ravel() for label, tau in taus.items()}
        span = histogram_range(np.concatenate(list(values.values())))
        fig, ax = plt.subplots(figsize=(6, 4))
        try:
            for label, data in values.items():
                ax.hist(data[np.isfinite(data)], bins=50, range=span, alpha=0.6, label=label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if len(values) > 1:
                ax.legend()
            fig.tight_layout()
            tracker.log_figure(fig, "tau_histogram.png")
        finally:
            plt.close(fig)
    except Exception as exc:  # noqa: BLE001 - a plot must never fail a finished run
        logger.warning("τ histogram not logged (%s: %s); the run is unaffected", type(exc).__name__, exc)


def start_run(cfg: Config, world_size: int) -> tuple[str, str]:
    """Create the MLflow run in the driver; returns (tracking_uri, run_id)."""
    from mlflow.tracking import MlflowClient

    from dist_tempnet.config import dump_config

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.mlflow.experiment)
    tags = {
        "mlflow.runName": cfg.mlflow.run_name or cfg.run.name,
        "git_commit": git_commit(),
        "task": cfg.run.task,
        "method": cfg.loss.name,
        "model": cfg.model.pretrained or cfg.model.preset,
        "world_size": str(world_size),
        "zero_stage": str(cfg.deepspeed.zero_stage),
        "mlflow.source.name": "dist-tempnet",
        **cfg.mlflow.tags,
    }
    run = client.create_run(exp_id, tags=tags)
    tracker = Tracker(uri, run.info.run_id)
    tracker.log_params(
        flatten(cfg.to_dict()) | {"world_size": world_size, "grad_accum_steps": cfg.grad_accum_steps}
    )
    tracker.log_text(dump_config(cfg), "config.yaml")
    return uri, run.info.run_id
