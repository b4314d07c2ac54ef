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

import contextlib
import csv
import io
import math
import os
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMPARISON_TAG = "dist_tempnet.comparison"
SWEEP_TAG = "dist_tempnet.sweep"
PARENT_TAG = "mlflow.parentRunId"
MISSING = "-"

# Metrics whose whole history is fetched (for plots and throughput); the rest use the final value.
_HISTORY_PREFIXES = ("loss", "tau/", "eval/", "samples_per_s", "tokens_per_s")
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
    return _RECALL_SPELLING.sub(r"recall@\1", key)


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
# The table


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


def _final(record: RunRecord, key: str) -> float | None:
    return _finite(record.metrics.get(key))


def wall_time_s(record: RunRecord) -> float | None:
    if record.start_ms is None or record.end_ms is None:
        return None
    return (record.end_ms - record.start_ms) / 1000.0


def throughput(record: RunRecord, key: str) -> float | None:
    """Mean of the logged rate, leaving out the first logged window (start-up, compilation)."""
    values = [v for _, _, v in record.histories.get(key, []) if math.isfinite(v)]
    if len(values) > 1:
        values = values[1:]
    return statistics.fmean(values) if values else None


def last_step(record: RunRecord) -> int | None:
    steps = [
        pts[-1][0]
        for key, pts in record.histories.items()
        if pts and (key == "loss" or key.startswith("tau/"))
    ]
    return max(steps) if steps else None


def _tau_extreme(record: RunRecord, keys: tuple[str, ...], pick: Callable[..., float]) -> float | None:
    values = [v for v in (_final(record, k) for k in keys) if v is not None]
    return pick(values) if values else None


def tau_mean(record: RunRecord) -> float | None:
    overall = _final(record, "tau/mean")
    if overall is not None:
        return overall
    sides = [v for v in (_final(record, "tau/image_mean"), _final(record, "tau/text_mean")) if v is not None]
    return statistics.fmean(sides) if sides else None


@dataclass(frozen=True)
class Column:
    key: str  # CSV header
    title: str  # printed / markdown header
    fmt: str  # format spec for floats; "" for text
    value: Callable[[RunRecord], Any]
    always: bool = True  # False: shown only when some run has a value
    aggregate: bool = False  # included (mean ± std) in the per-configuration group table


def _metric(key: str) -> Callable[[RunRecord], float | None]:
    return lambda r: _final(r, key)


_EVAL_COLUMNS = [
    ("zero_shot_acc", "zs_acc", ".4f"),
    ("zero_shot_chance", "zs_chance", ".4f"),
    ("zero_shot_acc_tail", "zs_tail", ".4f"),  # rarest third of the classes (long-tailed data)
    ("i2t_recall@1", "i2t@1", ".4f"),
    ("i2t_recall@5", "i2t@5", ".4f"),
    ("i2t_recall@10", "i2t@10", ".4f"),
    ("t2i_recall@1", "t2i@1", ".4f"),
    ("t2i_recall@5", "t2i@5", ".4f"),
    ("t2i_recall@10", "t2i@10", ".4f"),
    ("ppl", "ppl", ".3f"),
    ("ppl_tempnet", "ppl_tempnet", ".3f"),
    ("token_acc", "tok_acc", ".4f"),
    # Spearman's correlation of held-out τ with class frequency (CLIP) or predictive entropy (LM).
    ("tau_freq_spearman_image", "rho_tau_freq_img", ".3f"),
    ("tau_freq_spearman_text", "rho_tau_freq_txt", ".3f"),
    ("tau_entropy_spearman", "rho_tau_entropy", ".3f"),
]

COLUMNS: list[Column] = [
    Column("run_name", "run", "", lambda r: r.name),
    Column("run_id", "id", "", lambda r: r.run_id),
    Column("method", "method", "", lambda r: r.method),
    Column("model", "model", "", lambda r: r.tags.get("model") or r.params.get("model.preset", "")),
    Column(
        "world_size", "ws", "", lambda r: _int_or_none(r.tags.get("world_size") or r.params.get("world_size"))
    ),
    Column(
        "zero_stage",
        "zero",
        "",
        lambda r: _int_or_none(r.tags.get("zero_stage") or r.params.get("deepspeed.zero_stage")),
    ),
    Column("seed", "seed", "", lambda r: _int_or_none(r.seed)),
    Column("steps", "steps", "", lambda r: _int_or_none(r.params.get("train.steps"))),
    Column("last_step", "last", "", last_step),
    Column("status", "status", "", lambda r: r.status),
    Column("wall_time_s", "wall_s", ".1f", wall_time_s, aggregate=True),
    Column(
        "samples_per_s",
        "samples/s",
        ".1f",
        lambda r: throughput(r, "samples_per_s"),
        always=False,
        aggregate=True,
    ),
    Column(
        "tokens_per_s",
        "tokens/s",
        ".1f",
        lambda r: throughput(r, "tokens_per_s"),
        always=False,
        aggregate=True,
    ),
    Column("loss", "loss", ".4f", _metric("loss"), aggregate=True),
    *[
        Column(key, title, fmt, _metric(f"eval/{key}"), always=False, aggregate=key != "zero_shot_chance")
        for key, title, fmt in _EVAL_COLUMNS
    ],
    Column("tau_mean", "tau_mean", ".4g", tau_mean, aggregate=True),
    Column(
        "tau_min",
        "tau_min",
        ".4g",
        lambda r: _tau_extreme(r, ("tau/min", "tau/image_min", "tau/text_min"), min),
        aggregate=True,
    ),
    Column(
        "tau_max",
        "tau_max",
        ".4g",
        lambda r: _tau_extreme(r, ("tau/max", "tau/image_max", "tau/text_max"), max),
        aggregate=True,
    ),
    Column(  # the last trained samples' τ vs their class frequency: iSogCLR's τ has no held-out value
        "train_tau_freq_spearman",
        "rho_tau_freq_train",
        ".3f",
        _metric("train_tau/freq_spearman_image"),
        always=False,
        aggregate=True,
    ),
]


@dataclass
class Table:
    columns: list[Column]
    rows: list[list[Any]]  # raw values (None = missing)

    def formatted(
        self, missing: str = MISSING, short_ids: bool = False, names: Sequence[str] | None = None
    ) -> list[list[str]]:
        out = []
        for i, row in enumerate(self.rows):
            cells = []
            for col, value in zip(self.columns, row):
                text = format_value(value, col.fmt, missing)
                if short_ids and col.key == "run_id" and value:
                    text = value[:8]
                if names is not None and col.key == "run_name":
                    text = names[i]
                cells.append(text)
            out.append(cells)
        return out


def format_value(value: Any, fmt: str, missing: str = MISSING) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    if isinstance(value, float) and fmt:
        return format(value, fmt)
    return str(value)


def build_table(records: Sequence[RunRecord], columns: Sequence[Column] = COLUMNS) -> Table:
    """One row per run; optional columns appear only when at least one run has a value."""
    values = [[col.value(r) for col in columns] for r in records]
    keep = [i for i, col in enumerate(columns) if col.always or any(row[i] is not None for row in values)]
    return Table([columns[i] for i in keep], [[row[i] for i in keep] for row in values])


# ---------------------------------------------------------------------------------------------
# Groups: repeats of one configuration (a sweep point over seeds)


def config_key(record: RunRecord) -> tuple:
    params = tuple(sorted((k, v) for k, v in record.params.items() if not k.startswith(_NOT_CONFIG_PARAMS)))
    return (record.tags.get(PARENT_TAG, ""), record.method, params)


@dataclass
class Group:
    label: str
    method: str
    records: list[RunRecord]

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.records if r.status == "FINISHED"]


def _varying_params(keys: list[tuple]) -> list[str]:
    """Config params whose value differs between groups: what tells the groups apart."""
    dicts = [dict(k[2]) for k in keys]
    names = sorted(set().union(*dicts)) if dicts else []
    return [n for n in names if len({d.get(n) for d in dicts}) > 1]


def _modal_values(keys: list[tuple], names: list[str]) -> dict[str, str | None]:
    dicts = [dict(k[2]) for k in keys]
    return {n: statistics.mode([d.get(n) for d in dicts]) for n in names}


def _group_label(key: tuple, varying: list[str], modal: dict[str, str | None], max_keys: int = 3) -> str:
    """The method plus whatever sets this group apart from the usual value (e.g. `train.steps=5`)."""
    params = dict(key[2])
    own = [n for n in varying if n == "loss.name" or params.get(n) != modal[n]]
    shown = [f"{n}={params.get(n, MISSING)}" for n in own[:max_keys]]
    if len(own) > max_keys:
        shown.append("…")
    return " ".join(shown) or key[1] or "(all)"


def group_runs(records: Sequence[RunRecord]) -> list[Group]:
    """Runs with the same parent and the same config except seed, in order of first appearance."""
    by_key: dict[tuple, list[RunRecord]] = {}
    for r in records:
        by_key.setdefault(config_key(r), []).append(r)
    keys = list(by_key)
    varying = [n for n in _varying_params(keys) if n != "loss.name"]
    if len({k[1] for k in keys}) > 1:
        varying.insert(0, "loss.name")
    modal = _modal_values(keys, varying)
    return [Group(_group_label(k, varying, modal), k[1], rs) for k, rs in by_key.items()]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None when undefined)."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class GroupTable:
    columns: list[Column]  # the aggregated columns
    groups: list[Group]
    stats: list[list[tuple[float | None, float | None]]]  # per group, per column: (mean, std)

    def formatted(self) -> tuple[list[str], list[list[str]]]:
        header = ["group", "method", "runs", "failed", *[c.title for c in self.columns]]
        rows = []
        for group, stats in zip(self.groups, self.stats):
            cells = [
                group.label,
                group.method,
                str(len(group.finished)),
                str(len(group.records) - len(group.finished)),
            ]
            cells += [_pm(mean, std, col.fmt) for col, (mean, std) in zip(self.columns, stats)]
            rows.append(cells)
        return header, rows


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None:
        return MISSING
    return format_value(mean, fmt) + ("" if std is None else f" ± {format_value(std, fmt)}")


def build_group_table(groups: Sequence[Group], table_columns: Sequence[Column]) -> GroupTable:
    """Mean ± std over the FINISHED runs of each group (failed runs are counted, not averaged)."""
    columns = [c for c in table_columns if c.aggregate]
    stats = []
    for group in groups:
        row = []
        for col in columns:
            values = [v for v in (col.value(r) for r in group.finished) if v is not None]
            row.append(mean_std(values))
        stats.append(row)
    return GroupTable(columns, list(groups), stats)


# ---------------------------------------------------------------------------------------------
# Rendering


def render_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def render_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def table_csv(table: Table) -> str:
    """Full-precision values; an empty cell is a missing value."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.key for c in table.columns])
    for row in table.rows:
        writer.writerow(
            [
                ""
                if v is None or (isinstance(v, float) and not math.isfinite(v))
                else (repr(v) if isinstance(v, float) else str(v))
                for v in row
            ]
        )
    return buf.getvalue()


def groups_csv(gt: GroupTable) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["group", "method", "runs", "failed", "run_ids"]
    for col in gt.columns:
        header += [f"{col.key}_mean", f"{col.key}_std"]
    writer.writerow(header)
    for group, stats in zip(gt.groups, gt.stats):
        row = [
            group.label,
            group.method,
            len(group.finished),
            len(group.records) - len(group.finished),
            " ".join(r.run_id for r in group.records),
        ]
        for mean, std in stats:
            row += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
        writer.writerow(row)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Styler:
    """Colour by method, line style by repeat within the method, so seeds of a method read as one family."""

    STYLES = ("-", "--", ":", "-.")
    MARKERS = ("o", "s", "^", "D")

    def __init__(self, records: Sequence[RunRecord]) -> None:
        import matplotlib

        methods = list(dict.fromkeys(r.method for r in records))
        cmap = matplotlib.colormaps["tab10"]
        self.colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
        self.repeat: dict[str, int] = {}
        count: dict[str, int] = {}
        for r in records:
            self.repeat[r.run_id] = count.get(r.method, 0)
            count[r.method] = self.repeat[r.run_id] + 1

    def __call__(self, record: RunRecord, marker: bool = False) -> dict[str, Any]:
        i = self.repeat[record.run_id]
        style = {"color": self.colors[record.method], "linestyle": self.STYLES[i % len(self.STYLES)]}
        if marker:
            style["marker"] = self.MARKERS[i % len(self.MARKERS)]
        return style


def _xy(record: RunRecord, key: str, x: str) -> tuple[list[float], list[float]]:
    points = [(s, t, v) for s, t, v in record.histories.get(key, []) if math.isfinite(v)]
    if x == "step":
        xs = [float(s) for s, _, _ in points]
    else:
        start = record.start_ms or (points[0][1] if points else 0)
        xs = [(t - start) / 1000.0 for _, t, _ in points]
    return xs, [v for _, _, v in points]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _legend_room(fig, inches: float = 0.7) -> float:
    """Fraction of the figure height kept free at the bottom for the shared legend."""
    return min(0.2, inches / fig.get_figheight())


def _legend(fig, axes: Sequence[Any]) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend(
            [handles[lab] for lab in labels],
            labels,
            loc="lower center",
            ncol=min(3, len(labels)),
            fontsize=7,
            frameon=False,
        )


def plot_loss(records: Sequence[RunRecord], style: Styler, path: Path) -> Path | None:
    drawn = [r for r in records if _xy(r, "loss", "step")[0]]
    if not drawn:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r in drawn:
        few_points = len(r.histories["loss"]) < 20
        ax.plot(
            *_xy(r, "loss", "step"),
            label=f"{r.label} [{r.status}]" if r.status != "FINISHED" else r.label,
            markersize=4,
            **style(r, marker=few_points),
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    several = len({r.method for r in drawn}) > 1
    # Each method minimizes its own objective: their loss values are not on one scale.
    ax.set_title(
        "Training loss"
        + (" (objectives differ between methods: compare within a method)" if several else ""),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _eval_keys(records: Sequence[RunRecord]) -> list[str]:
    keys = {k for r in records for k, pts in r.histories.items() if k.startswith("eval/") and pts}
    keys.discard("eval/zero_shot_chance")
    order = [f"eval/{k}" for k, _, _ in _EVAL_COLUMNS]
    return [k for k in order if k in keys] + sorted(keys - set(order))


def _grid(n: int, plt, width: float = 4.2, height: float = 3.2):
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.8), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _eval_bars(ax, records: Sequence[RunRecord], key: str, style: Styler) -> None:
    drawn = [r for r in records if _xy(r, key, "step")[1]]
    for i, r in enumerate(drawn):
        ax.bar(
            i,
            _xy(r, key, "step")[1][-1],
            color=style(r)["color"],
            label=r.label,
            hatch=("", "//", "..", "xx")[style.repeat[r.run_id] % 4],
            edgecolor="white",
        )
    ax.set_xticks(range(len(drawn)), [r.label for r in drawn], rotation=30, ha="right", fontsize=7)


def plot_eval(records: Sequence[RunRecord], style: Styler, path: Path, x: str) -> Path | None:
    keys = _eval_keys(records)
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = _grid(len(keys), plt)
    for ax, key in zip(axes, keys):
        if x == "step" and all(len(r.histories.get(key, [])) <= 1 for r in records):
            _eval_bars(ax, records, key, style)  # evaluated once, at the end: a line plot says nothing
        else:
            for r in records:
                xs, ys = _xy(r, key, x)
                if xs:
                    ax.plot(xs, ys, markersize=5, label=r.label, **style(r, marker=True))
            ax.set_xlabel("step" if x == "step" else "wall time since run start [s]", fontsize=8)
        if key == "eval/zero_shot_acc":
            chances = {v for r in records if (v := _final(r, "eval/zero_shot_chance")) is not None}
            for c in chances:
                ax.axhline(c, color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.set_title(key.removeprefix("eval/"), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    _legend(fig, axes)
    title = "vs step (bars: evaluated only at the end)" if x == "step" else "vs wall time since run start"
    fig.suptitle(f"Evaluation metrics {title}", fontsize=10)
    fig.tight_layout(rect=(0, _legend_room(fig), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tau_sides(records: Sequence[RunRecord]) -> list[tuple[str, str]]:
    """(title, metric prefix) pairs: image/text TempNets when logged, else the overall τ."""
    has = {k for r in records for k in r.histories}
    sides = [(s, f"tau/{s}_") for s in ("image", "text") if f"tau/{s}_mean" in has]
    return sides or ([("τ", "tau/")] if "tau/mean" in has else [])


def plot_tau_over_steps(records: Sequence[RunRecord], style: Styler, path: Path) -> Path | None:
    """τ mean per run with its batch min–max as a band: how the τ distribution evolves."""
    sides = _tau_sides(records)
    if not sides:
        return None
    plt = _pyplot()
    fig, axes = _grid(len(sides), plt, width=5.5, height=3.8)
    for ax, (title, prefix) in zip(axes, sides):
        for r in records:
            xs, mean = _xy(r, f"{prefix}mean", "step")
            if not xs:
                continue
            kw = style(r)
            ax.plot(xs, mean, label=r.label, **kw)
            lo_x, lo = _xy(r, f"{prefix}min", "step")
            hi_x, hi = _xy(r, f"{prefix}max", "step")
            if lo and hi and lo_x == hi_x:
                ax.fill_between(lo_x, lo, hi, color=kw["color"], alpha=0.12, linewidth=0)
        ax.set_title(f"{title} τ: mean (line), batch min–max (band)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    _legend(fig, axes)
    fig.tight_layout(rect=(0, _legend_room(fig), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tau_final(records: Sequence[RunRecord], style: Styler, path: Path) -> Path | None:
    """Per run, the last logged τ batch statistics: mean (marker) and min–max (bar)."""
    sides = _tau_sides(records)
    drawn = [r for r in records if any(_final(r, f"{p}mean") is not None for _, p in sides)]
    if not drawn:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.9 + 0.45 * len(drawn) * len(sides)))
    markers = ("o", "s", "^")
    labels, y = [], 0
    for r in drawn:
        for i, (title, prefix) in enumerate(sides):
            mean = _final(r, f"{prefix}mean")
            if mean is None:
                continue
            lo, hi = _final(r, f"{prefix}min"), _final(r, f"{prefix}max")
            # float32 batch means can land a hair outside [min, max]
            err = (
                [[max(0.0, mean - lo)], [max(0.0, hi - mean)]] if lo is not None and hi is not None else None
            )
            ax.errorbar([mean], [y], xerr=err, fmt=markers[i % 3], color=style(r)["color"], capsize=3)
            labels.append(f"{r.label} ({title})")
            y += 1
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("τ at the last logged step (marker: batch mean, bar: batch min–max)")
    ax.grid(alpha=0.3, axis="x", which="both")
    return _save(fig, path)


@contextlib.contextmanager
def _quiet_artifact_downloads() -> Iterator[None]:
    # MLflow draws its own download bar for every artifact, even into logs; one per run is noise.
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def _download_tau_histograms(
    client, records: Sequence[RunRecord], dest: Path
) -> list[tuple[RunRecord, Path]]:
    found = []
    for r in records:
        try:
            names = {a.path for a in client.list_artifacts(r.run_id)}
            if "tau_histogram.png" not in names:
                continue
            target = dest / r.run_id
            target.mkdir(parents=True, exist_ok=True)
            with _quiet_artifact_downloads():
                local = client.download_artifacts(r.run_id, "tau_histogram.png", str(target))
            found.append((r, Path(local)))
        except Exception as exc:  # noqa: BLE001 - a missing artifact store must not sink the comparison
            warnings.warn(f"run {r.name}: could not fetch tau_histogram.png ({exc})", stacklevel=2)
    return found


def plot_tau_histograms(client, records: Sequence[RunRecord], path: Path) -> Path | None:
    """The runs' own held-out τ histograms (logged by training), tiled into one figure."""
    with tempfile.TemporaryDirectory(prefix="dist-tempnet-compare-") as tmp:
        found = _download_tau_histograms(client, records, Path(tmp))
        if not found:
            return None
        plt = _pyplot()
        fig, axes = _grid(len(found), plt, width=4.5, height=3.2)
        for ax, (r, png) in zip(axes, found):
            ax.imshow(plt.imread(png))
            ax.set_title(r.label, fontsize=8)
            ax.axis("off")
        fig.suptitle("τ histograms on the held-out split (per run)", fontsize=10)
        return _save(fig, path)


def write_plots(client, records: Sequence[RunRecord], out: Path) -> list[Path]:
    style = Styler(records)
    made = [
        plot_loss(records, style, out / "loss_vs_step.png"),
        plot_eval(records, style, out / "eval_vs_step.png", "step"),
        plot_eval(records, style, out / "eval_vs_wall_time.png", "time"),
        plot_tau_over_steps(records, style, out / "tau_vs_step.png"),
        plot_tau_final(records, style, out / "tau_final.png"),
        plot_tau_histograms(client, records, out / "tau_histograms.png"),
    ]
    return [p for p in made if p is not None]


# ---------------------------------------------------------------------------------------------
# The comparison as a whole


@dataclass
class Comparison:
    records: list[RunRecord]
    table: Table
    groups: GroupTable
    files: list[Path] = field(default_factory=list)

    @property
    def _title(self) -> str:
        prefix = shared_name_prefix([r.name for r in self.records])
        return f"Runs {prefix}* ({len(self.records)})" if prefix else f"Runs ({len(self.records)})"

    def text(self) -> str:
        header = [c.title for c in self.table.columns]
        names = [r.label for r in self.records]
        parts = [self._title + ":", render_text(header, self.table.formatted(short_ids=True, names=names))]
        if any(len(g.records) > 1 for g in self.groups.groups):
            g_header, g_rows = self.groups.formatted()
            parts += [
                "",
                "Per configuration (mean ± sample std over finished runs):",
                render_text(g_header, g_rows),
            ]
        return "\n".join(parts)

    def markdown(self) -> str:
        header = [c.title for c in self.table.columns]
        g_header, g_rows = self.groups.formatted()
        return "\n".join(
            [
                f"## {self._title}",
                "",
                render_markdown(header, self.table.formatted(names=[r.label for r in self.records])),
                "",
                "## Per configuration (mean ± sample std over finished runs)",
                "",
                render_markdown(g_header, g_rows),
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
    comparison = Comparison(records, table, build_group_table(group_runs(records), table.columns))
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
