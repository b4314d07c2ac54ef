"""MLflow tracking, rank 0 and driver, and never fatal.

The driver creates the run (so it can print its id and log the resolved config before any worker
starts); rank 0 of the workers logs into it by id. Every call is bounded (the driver and the
workers run with MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 and MLFLOW_HTTP_REQUEST_TIMEOUT=5 unless set):
a call that fails is appended to a local spool, `<run.output_dir>/<run.name>/mlflow-spool.jsonl`,
and the next logging call after a back-off first replays the spool, so the run in MLflow ends up
complete and in order once the server answers again. If the server is down when the run starts,
the run gets a placeholder id (`pending-…`) and is created from the spool when it comes back.
Whatever is still spooled at the end is named in the driver's closing lines; `dist-tempnet
mlflow-replay SPOOL` (or `replay_spool`) sends it later. Figures and artifacts are best-effort:
they are not spooled, only counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dist_tempnet.config import Config

logger = logging.getLogger(__name__)

SPOOL_NAME = "mlflow-spool.jsonl"
PENDING_PREFIX = "pending-"
# MLflow 3 opens an experiment on its GenAI overview unless the experiment says what it is for;
# with this tag the UI opens it on its runs (the value is one of the UI's ExperimentKind values).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# Bounded HTTP calls: MLflow's default (7 retries, exponential back-off) blocks a caller for
# minutes per call while the server is down. Training and the driver spool instead.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# Server-side limits of one log_batch call.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100


def bounded_http_env() -> dict[str, str]:
    """The MLflow HTTP settings for the driver and the workers (the user's own values win)."""
    return {k: os.environ.get(k, v) for k, v in HTTP_ENV_DEFAULTS.items()}


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


def spool_path(cfg: Config) -> Path:
    """Where the MLflow calls of this run that did not get through are kept."""
    return Path(cfg.run.output_dir).resolve() / cfg.run.name / SPOOL_NAME


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


def _rejected(exc: Exception) -> bool:
    """The server refused the values themselves: sending them again can never succeed."""
    return getattr(exc, "error_code", "") in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS")


def ensure_experiment(client: Any, name: str) -> str:
    """The id of experiment `name` (created if missing), marked as a model-training experiment."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:  # a kind someone chose in the UI stays
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


class Spool:
    """MLflow calls that did not reach the server, in order: JSON lines in a file (or in memory).

    Records: `create_run`, `log` (metrics/params/tags of one log_batch), `text`, `terminate`; each
    names its run id and tracking URI. The driver and rank 0 may share one file: appends and replays
    hold an exclusive lock (`flock`) on it. Placeholder run ids created while the server was down
    are mapped to the real ids in `<spool>.runs.json`.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else None
        self._memory: list[dict[str, Any]] = []
        self._ids: dict[str, str] = {}

    @property
    def ids_path(self) -> Path | None:
        return self.path.with_name(self.path.name + ".runs.json") if self.path else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A separate lock file: the spool itself is replaced (os.replace) when a replay rewrites it.
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self) -> list[dict[str, Any]]:
        if self.path is None:
            return list(self._memory)
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _write(self, records: list[dict[str, Any]]) -> None:
        if self.path is None:
            self._memory = list(records)
            return
        text = "".join(json.dumps(r) + "\n" for r in records)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)

    def run_ids(self) -> dict[str, str]:
        """Placeholder run id → real MLflow run id, for runs created by a replay."""
        if self.ids_path is not None and self.ids_path.is_file():
            self._ids = json.loads(self.ids_path.read_text(encoding="utf-8"))
        return dict(self._ids)

    def _save_ids(self) -> None:
        if self.ids_path is not None:
            self.ids_path.write_text(json.dumps(self._ids, indent=1), encoding="utf-8")

    def __len__(self) -> int:
        if self.path is None:
            return len(self._memory)
        return len(self._read()) if self.path.is_file() and self.path.stat().st_size else 0

    def append(self, record: dict[str, Any]) -> None:
        if self.path is None:
            self._memory.append(record)
            return
        with self._locked(), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        with self._locked():
            return self._read()

    def apply(self, client: Any, record: dict[str, Any]) -> None:
        """Send one record (raises what MLflow raises)."""
        from mlflow.entities import Metric, Param, RunTag

        op = record["op"]
        if op == "create_run":
            if record["run_id"] in self.run_ids():
                return
            exp_id = ensure_experiment(client, record["experiment"])
            run = client.create_run(exp_id, start_time=record["start_time"], tags=record["tags"])
            self._ids[record["run_id"]] = run.info.run_id
            self._save_ids()
            logger.info(f"MLflow run {run.info.run_id} created for {record['run_id']} from the spool")
            return
        run_id = self.run_ids().get(record["run_id"], record["run_id"])
        if run_id.startswith(PENDING_PREFIX):
            raise RuntimeError(f"MLflow run {run_id} has not been created yet")
        if op == "log":
            client.log_batch(
                run_id,
                metrics=[Metric(k, v, ts, step) for k, v, ts, step in record.get("metrics", [])],
                params=[Param(k, v) for k, v in record.get("params", {}).items()],
                tags=[RunTag(k, v) for k, v in record.get("tags", {}).items()],
            )
        elif op == "text":
            client.log_text(run_id, record["text"], record["artifact_file"])
        elif op == "terminate":
            client.set_terminated(run_id, record["status"], end_time=record["end_time"])
        else:
            raise ValueError(f"unknown MLflow spool record {op!r}")

    def replay(self, client: Any, uri: str | None = None) -> int:
        """Send the spooled records (of tracking URI `uri`, or all) in order; stop at the first
        failure (that record and the rest are kept) and raise it. Records the server rejects as
        invalid are dropped with a warning. Returns how many were sent."""
        with self._locked():
            records = self._read()
            keep = [r for r in records if uri is not None and r["uri"] != uri]
            todo = [r for r in records if uri is None or r["uri"] == uri]
            for i, record in enumerate(todo):
                try:
                    self.apply(client, record)
                except Exception as exc:  # noqa: BLE001 - tracking must never kill training
                    if _rejected(exc):
                        logger.warning(f"MLflow rejected a spooled {record['op']} record, dropping it: {exc}")
                        continue
                    self._write(keep + todo[i:])
                    raise
            if todo:
                self._write(keep)
            return len(todo)

    def waiting(self, uri: str) -> bool:
        """Whether records for tracking URI `uri` are spooled (cheap when the spool is empty)."""
        if self.path is None:
            return any(r["uri"] == uri for r in self._memory)
        if not self.path.is_file() or not self.path.stat().st_size:
            return False
        return any(r["uri"] == uri for r in self.records())

    def describe(self) -> str:
        """What is in the spool, for a closing line: e.g. '120 metric values, 3 tags, run status'."""
        counts = {"metric values": 0, "params": 0, "tags": 0, "texts": 0, "run creation": 0, "run status": 0}
        for r in self.records():
            counts["metric values"] += len(r.get("metrics", []))
            counts["params"] += len(r.get("params", {}))
            counts["tags"] += len(r.get("tags", {}))
            counts["texts"] += r["op"] == "text"
            counts["run creation"] += r["op"] == "create_run"
            counts["run status"] += r["op"] == "terminate"
        return ", ".join(f"{n} {k}" if k not in ("run creation", "run status") else k
                         for k, n in counts.items() if n)  # fmt: skip


def replay_spool(path: str | os.PathLike, tracking_uri: str = "") -> tuple[int, int]:
    """Send a spool file to MLflow (the URI recorded in it unless given); returns (sent, left)."""
    from mlflow.tracking import MlflowClient

    spool = Spool(path)
    records = spool.records()
    if not records:
        return 0, 0
    if tracking_uri:
        sent = spool.replay(MlflowClient(tracking_uri=tracking_uri))
    else:
        sent = 0
        for uri in dict.fromkeys(r["uri"] for r in records):
            sent += spool.replay(MlflowClient(tracking_uri=uri), uri)
    return sent, len(spool)


class Tracker:
    """A thin, failure-tolerant wrapper over MlflowClient bound to one run.

    `Tracker.disabled()` is a no-op stand-in for ranks other than 0 and runs without MLflow.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        spool: str | os.PathLike | None = None,
        backoff_s: float = 30.0,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.spool = Spool(spool)
        self.failures = 0
        self.artifacts_lost: list[str] = []
        self._warned = False
        # After a failure, calls go straight to the spool for backoff_s, so a slow or unreachable
        # server costs one timeout per window instead of one per logging call.
        self._backoff_s = backoff_s
        self._skip_until = 0.0

    @classmethod
    def disabled(cls) -> Tracker:
        self = cls.__new__(cls)
        self.run_id = ""
        self.client = None
        self.failures = 0
        self.artifacts_lost = []
        return self

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def pending(self) -> int:
        """Records waiting in the spool (of this run and any other written to the same file)."""
        return len(self.spool) if self.enabled else 0

    # -- sending --------------------------------------------------------------------------------

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self._skip_until = time.monotonic() + self._backoff_s
        if not self._warned:
            where = self.spool.path or "memory"
            logger.warning(
                f"MLflow tracking failed ({type(exc).__name__}: {str(exc)[:300]}); training continues, "
                f"calls are kept in {where} and replayed when the server answers"
            )
            self._warned = True

    def _online(self) -> bool:
        """Whether to call the server now: not backing off, and the spool got through first (order)."""
        if time.monotonic() < self._skip_until:
            return False
        if self.spool.waiting(self.tracking_uri):
            try:
                self.spool.replay(self.client, self.tracking_uri)
            except Exception as exc:  # noqa: BLE001 - tracking must never kill training
                self._failed(exc)
                return False
            if self._warned:
                logger.info(f"MLflow reachable again; spooled calls replayed to run {self.resolved_run_id()}")
                self._warned = False
        return True

    def resolved_run_id(self) -> str:
        """The run id, with a placeholder replaced by the real id once the run was created."""
        if self.run_id.startswith(PENDING_PREFIX):
            self.run_id = self.spool.run_ids().get(self.run_id, self.run_id)
        return self.run_id

    def _send(self, record: dict[str, Any]) -> bool:
        """Apply `record` now, or spool it; True when the server took it."""
        record = {"uri": self.tracking_uri, "run_id": self.resolved_run_id(), **record}
        if self._online():
            try:
                self.spool.apply(self.client, record)
                return True
            except Exception as exc:  # noqa: BLE001 - tracking must never kill training
                if _rejected(exc):
                    logger.warning(f"MLflow rejected a {record['op']} call, dropping it: {exc}")
                    return False
                self._failed(exc)
        self.spool.append(record)
        return False

    def create_run(self, experiment: str, tags: dict[str, str]) -> str:
        """Create the run (or a placeholder created from the spool later); returns its id."""
        start = int(time.time() * 1000)
        try:
            exp_id = ensure_experiment(self.client, experiment)
            self.run_id = self.client.create_run(exp_id, start_time=start, tags=tags).info.run_id
        except Exception as exc:  # noqa: BLE001 - an unreachable server must not stop training
            self._failed(exc)
            self.run_id = PENDING_PREFIX + uuid.uuid4().hex
            self.spool.append(
                {
                    "op": "create_run",
                    "uri": self.tracking_uri,
                    "run_id": self.run_id,
                    "experiment": experiment,
                    "tags": tags,
                    "start_time": start,
                }  # fmt: skip
            )
        return self.run_id

    # -- the logging API ----------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        rows = [[metric_name(k), float(v), now, int(step)] for k, v in metrics.items()]
        for i in range(0, len(rows), _MAX_METRICS):
            self._send({"op": "log", "metrics": rows[i : i + _MAX_METRICS]})

    def flush(self, force: bool = False) -> None:
        """Replay what is spooled; `force` ignores the failure back-off (end of training)."""
        if not self.enabled:
            return
        if force:
            self._skip_until = 0.0
        self._online()

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        items = [(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS):
            self._send({"op": "log", "params": dict(items[i : i + _MAX_PARAMS])})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled:
            return
        items = [(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_TAGS):
            self._send({"op": "log", "tags": dict(items[i : i + _MAX_TAGS])})

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._send({"op": "text", "text": text, "artifact_file": artifact_file})

    def _best_effort(self, what: str, fn, *args) -> None:
        # Artifacts are not spooled (they can be large); a lost one is named in the closing lines.
        if self._online():
            try:
                fn(self.resolved_run_id(), *args)
                return
            except Exception as exc:  # noqa: BLE001 - tracking must never kill training
                self._failed(exc)
        self.artifacts_lost.append(what)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._best_effort(str(path), self.client.log_artifact, str(path), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            self._best_effort(artifact_file, self.client.log_figure, figure, artifact_file)

    def terminate(self, status: str = "FINISHED", detail: str = "", end_time: int | None = None) -> None:
        """End the run with `status` (at `end_time`, ms since the epoch; default now); `status_detail`
        says how (it said `training` until now)."""
        if self.enabled:
            self._skip_until = 0.0
            self.set_tags({"status_detail": detail or status.lower()})
            end_time = end_time or int(time.time() * 1000)
            self._send({"op": "terminate", "status": status, "end_time": end_time})

    def not_recorded(self) -> str:
        """'' when MLflow has everything of this tracker, else one line saying what and where."""
        if not self.enabled:
            return ""
        parts = []
        if self.pending:
            where = self.spool.path or "memory (lost at exit)"
            parts.append(f"{self.spool.describe()} are kept in {where}")
            if self.spool.path:
                parts.append(f"send them with `dist-tempnet mlflow-replay {self.spool.path}`")
        if self.artifacts_lost:
            parts.append(f"artifacts not logged: {', '.join(self.artifacts_lost)}")
        return f"MLflow ({self.tracking_uri}) did not record everything: " + "; ".join(parts) if parts else ""


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


def run_tags(cfg: Config, world_size: int) -> dict[str, str]:
    return {
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


def open_run(cfg: Config, world_size: int) -> Tracker:
    """Create the MLflow run (in the driver) and log the config; never raises for an unreachable
    server (the run is then created from the spool later: `tracker.run_id` starts with 'pending-')."""
    from dist_tempnet.config import dump_config

    os.environ.update(bounded_http_env())
    tracker = Tracker(resolve_tracking_uri(cfg.mlflow.tracking_uri), "", spool=spool_path(cfg))
    tracker.create_run(cfg.mlflow.experiment, run_tags(cfg, world_size))
    tracker.log_params(
        flatten(cfg.to_dict()) | {"world_size": world_size, "grad_accum_steps": cfg.grad_accum_steps}
    )
    tracker.log_text(dump_config(cfg), "config.yaml")
    return tracker


def start_run(cfg: Config, world_size: int) -> tuple[str, str]:
    """Create the MLflow run in the driver; returns (tracking_uri, run_id)."""
    tracker = open_run(cfg, world_size)
    return tracker.tracking_uri, tracker.run_id
