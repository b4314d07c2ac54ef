"""Reading MLflow runs for comparison: selection (experiment, ids, sweep parents, filters) and
one `RunRecord` per run with the metric histories the tables and plots need."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_tempnet import metric_names as names

COMPARISON_TAG = "dist_tempnet.comparison"
SWEEP_TAG = "dist_tempnet.sweep"
PARENT_TAG = "mlflow.parentRunId"
MISSING = "-"

# Metrics whose whole history is fetched (for plots and throughput); the rest use the final value.
_HISTORY_PREFIXES = (names.LOSS, names.TAU, names.TAU_SIDE, names.EVAL, names.THROUGHPUT)
# Params that differ between the seeds of one configuration, or that only name/locate the run:
# ignored when deciding which runs are repeats of the same configuration.
_NOT_CONFIG_PARAMS = (
    "run.seed",
    "run.name",
    "run.description",
    "run.output_dir",
    "mlflow.",
    "ray.address",
    "ray.quiet",
)


class CompareError(ValueError):
    """The runs asked for cannot be found or read; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Reading runs


@dataclass
class RunRecord:
    """One MLflow run with what the table and plots need (histories keyed by metric name)."""

    run_id: str
    name: str
    experiment_id: str
    status: str
    start_ms: int | None
    end_ms: int | None
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # latest value of each metric
    histories: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)  # (step, ts_ms, value)
    short_name: str = ""  # the name without a prefix every compared run shares (e.g. the sweep's)

    @property
    def label(self) -> str:
        return self.short_name or self.name

    @property
    def method(self) -> str:
        return self.tags.get("method") or self.params.get("loss.name", "")

    @property
    def seed(self) -> str:
        return self.params.get("run.seed", "")


def _all_pages(fetch: Callable[[str | None], Any], limit: int) -> list[Any]:
    items: list[Any] = []
    token = None
    while len(items) < limit:
        page = fetch(token)
        items.extend(page)
        token = page.token
        if not token:
            break
    return items[:limit]


def _search(client, experiment_ids: list[str], filter_string: str, limit: int) -> list[Any]:
    return _all_pages(
        lambda token: client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            max_results=min(limit, 1000),
            order_by=["attributes.start_time ASC"],
            page_token=token,
        ),
        limit,
    )


def _experiment_ids(client, experiment: str | None) -> list[str]:
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise CompareError(
                f"no MLflow experiment named {experiment!r} (experiments in this store: "
                f"{', '.join(known) or 'none'})"
            )
        return [exp.experiment_id]
    return [e.experiment_id for e in client.search_experiments()]


def _is_bookkeeping(run) -> bool:
    """Sweep parents and earlier comparisons hold no training metrics of their own."""
    return SWEEP_TAG in run.data.tags or COMPARISON_TAG in run.data.tags


def _runs_by_id(client, run_ids: Sequence[str], limit: int) -> list[Any]:
    from mlflow.exceptions import MlflowException

    runs = []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise CompareError(f"run {run_id!r} not found in the tracking store ({exc.message})") from exc
        if SWEEP_TAG in run.data.tags:
            children = _search(client, [run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'", limit)
            runs.extend(children)
        else:
            runs.append(run)
    return runs


def select_runs(
    client,
    experiment: str | None = None,
    run_ids: Sequence[str] = (),
    filter_string: str = "",
    limit: int = 200,
) -> list[Any]:
    """The runs to compare, oldest first, without sweep parents and comparison runs."""
    if run_ids:
        runs = _runs_by_id(client, run_ids, limit)
    else:
        runs = _search(client, _experiment_ids(client, experiment), filter_string, limit)
    seen: set[str] = set()
    unique = []
    for run in runs:
        if run.info.run_id not in seen and not _is_bookkeeping(run):
            seen.add(run.info.run_id)
            unique.append(run)
    return unique


# MLflow rejects '@' in metric names, so `eval/i2t_recall@1` reaches the store spelled some other way
# (`eval/i2t_recall_at_1`, `..._at1`, `..._1`, `...-1`); read any of them back under the canonical name.
_RECALL_SPELLING = re.compile(r"recall(?:@|_at_?|_|-|\.)(\d+)$")


def canonical_metric_name(key: str) -> str:
    """The name compare uses for a stored metric: recall@k, and a name logged before the layout of
    metric_names.py (e.g. `loss`, `samples_per_s`) under its current one, so older runs compare too."""
    return _RECALL_SPELLING.sub(r"recall@\1", names.renamed(key) or key)


def mlflow_metric_name(key: str) -> str:
    """The spelling of a canonical metric name that MLflow accepts ('@' is not allowed)."""
    return key.replace("@", "_at_")


def _wants_history(key: str) -> bool:
    return any(key == p or (p.endswith("/") and key.startswith(p)) for p in _HISTORY_PREFIXES)


def load_record(client, run) -> RunRecord:
    info, data = run.info, run.data
    record = RunRecord(
        run_id=info.run_id,
        name=data.tags.get("mlflow.runName") or info.run_name or info.run_id[:8],
        experiment_id=info.experiment_id,
        status=info.status,
        start_ms=info.start_time,
        end_ms=info.end_time,
        tags=dict(data.tags),
        params=dict(data.params),
        metrics={canonical_metric_name(k): float(v) for k, v in data.metrics.items()},
    )
    for stored in sorted(data.metrics):
        key = canonical_metric_name(stored)
        if _wants_history(key):
            points = client.get_metric_history(info.run_id, stored)
            record.histories[key] = sorted((m.step, m.timestamp, float(m.value)) for m in points)
    return record


# ---------------------------------------------------------------------------------------------
# CLI


def make_client(tracking_uri: str):
    """(MlflowClient, resolved URI). A local SQLite file must already exist: MLflow would quietly create
    an empty store and the comparison would just find no runs."""
    from mlflow.tracking import MlflowClient

    from dist_tempnet.runtime.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise CompareError(
                f"no MLflow store at {db} (pass --tracking-uri, set MLFLOW_TRACKING_URI, "
                "or run from the directory that holds mlflow.db)"
            )
    return MlflowClient(tracking_uri=uri), uri
