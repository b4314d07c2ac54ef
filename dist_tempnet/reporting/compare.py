"""`dist-tempnet compare`: one table and a few plots for a set of MLflow runs.

Runs are selected by experiment name, run ids (a sweep's parent id stands for its children) or an
MLflow filter string, and read only through the MLflow API (`search_runs`, metric histories,
artifacts), so the same command works on the local SQLite store and on a tracking server.

Outputs (all optional but the printed table): `table.csv` / `table.md` (one row per run),
`groups.csv` (mean ± std over the seeds of one configuration, e.g. one sweep point), and PNG
plots: loss vs step, eval metrics vs step and vs wall time, τ over training, final τ range per
run, and the runs' own `tau_histogram.png` artifacts tiled into one figure.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dist_tempnet.reporting.plots import write_plots
from dist_tempnet.reporting.runs import (  # noqa: F401 - the reporting API, re-exported
    COMPARISON_TAG,
    PARENT_TAG,
    SWEEP_TAG,
    CompareError,
    RunRecord,
    load_record,
    make_client,
    select_runs,
)
from dist_tempnet.reporting.table import (
    COLUMNS,
    _formatted,
    build_group_table,
    build_table,
    formatted_groups,
    groups_csv,
    render_markdown,
    render_text,
    table_csv,
)

# ---------------------------------------------------------------------------------------------
# The comparison as a whole


@dataclass
class Comparison:
    records: list[RunRecord]
    table: pd.DataFrame  # one row per run (build_table)
    groups: pd.DataFrame  # one row per configuration (build_group_table)
    files: list[Path] = field(default_factory=list)

    @property
    def _title(self) -> str:
        prefix = shared_name_prefix([r.name for r in self.records])
        return f"Runs {prefix}* ({len(self.records)})" if prefix else f"Runs ({len(self.records)})"

    def _cells(self, short_ids: bool) -> pd.DataFrame:
        table = self.table.assign(run_name=[r.label for r in self.records])
        if short_ids:
            table = table.assign(run_id=table["run_id"].str[:8])
        return _formatted(table, COLUMNS)

    def _group_cells(self) -> pd.DataFrame:
        return formatted_groups(self.groups, [c for c in COLUMNS if c.key in self.table.columns])

    def text(self) -> str:
        parts = [self._title + ":", render_text(self._cells(short_ids=True))]
        if (self.groups["runs"] + self.groups["failed"] > 1).any():
            parts += [
                "",
                "Per configuration (mean ± sample std over finished runs):",
                render_text(self._group_cells()),
            ]
        return "\n".join(parts)

    def markdown(self) -> str:
        return "\n".join(
            [
                f"## {self._title}",
                "",
                render_markdown(self._cells(short_ids=False)),
                "",
                "## Per configuration (mean ± sample std over finished runs)",
                "",
                render_markdown(self._group_cells()),
                "",
            ]
        )


def shared_name_prefix(names: Sequence[str]) -> str:
    """The `<sweep name>/` every name starts with, if any (child runs of one sweep)."""
    heads = {n.rpartition("/")[0] for n in names}
    if len(names) < 2 or len(heads) != 1 or not next(iter(heads)):
        return ""
    return heads.pop() + "/"


def compare(client, runs: Sequence[Any], out: Path | None = None, plots: bool = True) -> Comparison:
    """Build the comparison of `runs` (MLflow Run objects); with `out`, write tables and plots there."""
    records = [load_record(client, run) for run in runs]
    prefix = shared_name_prefix([r.name for r in records])
    for r in records:
        r.short_name = r.name.removeprefix(prefix)
    table = build_table(records)
    shown = [c for c in COLUMNS if c.key in table.columns]
    comparison = Comparison(records, table, build_group_table(records, shown))
    if out is not None:
        comparison.files = write_outputs(client, comparison, out, plots)
    return comparison


def write_outputs(client, comparison: Comparison, out: Path, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in (
        ("table.csv", table_csv(comparison.table)),
        ("groups.csv", groups_csv(comparison.groups)),
        ("table.md", comparison.markdown()),
    ):
        (out / name).write_text(text)
        files.append(out / name)
    if plots and comparison.records:
        files += write_plots(client, comparison.records, out)
    return files


def log_comparison(client, comparison: Comparison, out: Path, experiment_name: str | None = None) -> str:
    """Log the written tables and plots as artifacts of a new run tagged as a comparison."""
    exp_ids = {r.experiment_id for r in comparison.records}
    if len(exp_ids) == 1 and not experiment_name:
        exp_id = exp_ids.pop()
    else:
        name = experiment_name or "dist_tempnet_comparisons"
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(name)
    ids = " ".join(r.run_id for r in comparison.records)
    run = client.create_run(
        exp_id,
        tags={
            "mlflow.runName": f"compare-{len(comparison.records)}-runs-{time.strftime('%Y%m%d-%H%M%S')}",
            COMPARISON_TAG: "true",
            "dist_tempnet.compared_runs": ids[:4900],
            "mlflow.source.name": "dist-tempnet compare",
        },
    )
    try:
        client.log_artifacts(run.info.run_id, str(out), "comparison")
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
