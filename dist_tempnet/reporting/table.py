"""The comparison tables: one row per run, and mean ± std per configuration (pandas), rendered
as text, Markdown (tabulate) and CSV."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from dist_tempnet import metric_names as names
from dist_tempnet.reporting.runs import _NOT_CONFIG_PARAMS, MISSING, PARENT_TAG, RunRecord

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
        if pts and (key == names.LOSS or key.startswith(names.TAU))
    ]
    return max(steps) if steps else None


def _tau_keys(stat: str) -> tuple[str, ...]:
    """The LM's tau/<stat> and CLIP's per-side train/tau/image_<stat>, train/tau/text_<stat>."""
    return (f"{names.TAU}{stat}", f"{names.TAU_SIDE}image_{stat}", f"{names.TAU_SIDE}text_{stat}")


def _tau_extreme(record: RunRecord, keys: tuple[str, ...], pick: Callable[..., float]) -> float | None:
    values = [v for v in (_final(record, k) for k in keys) if v is not None]
    return pick(values) if values else None


def tau_mean(record: RunRecord) -> float | None:
    overall = _final(record, f"{names.TAU}mean")
    if overall is not None:
        return overall
    sides = [_final(record, f"{names.TAU_SIDE}{side}_mean") for side in ("image", "text")]
    sides = [v for v in sides if v is not None]
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
        lambda r: throughput(r, names.per_s("samples")),
        always=False,
        aggregate=True,
    ),
    Column(
        "tokens_per_s",
        "tokens/s",
        ".1f",
        lambda r: throughput(r, names.per_s("tokens")),
        always=False,
        aggregate=True,
    ),
    Column("loss", "loss", ".4f", _metric(names.LOSS), aggregate=True),
    *[
        Column(
            key, title, fmt, _metric(f"{names.EVAL}{key}"), always=False, aggregate=key != "zero_shot_chance"
        )
        for key, title, fmt in _EVAL_COLUMNS
    ],
    Column("tau_mean", "tau_mean", ".4g", tau_mean, aggregate=True),
    Column(
        "tau_min",
        "tau_min",
        ".4g",
        lambda r: _tau_extreme(r, _tau_keys("min"), min),
        aggregate=True,
    ),
    Column(
        "tau_max",
        "tau_max",
        ".4g",
        lambda r: _tau_extreme(r, _tau_keys("max"), max),
        aggregate=True,
    ),
    Column(  # the last trained samples' τ vs their class frequency: iSogCLR's τ has no held-out value
        "train_tau_freq_spearman",
        "rho_tau_freq_train",
        ".3f",
        _metric(f"{names.TRAIN_TAU}freq_spearman_image"),
        always=False,
        aggregate=True,
    ),
]


def _cell_values(records: Sequence[RunRecord], columns: Sequence[Column]) -> pd.DataFrame:
    """One row per run, one column per `Column` (missing values as NA; whole numbers as Int64)."""
    df = pd.DataFrame({col.key: [col.value(r) for r in records] for col in columns}, dtype=object)
    for col in columns:
        values = df[col.key].dropna()
        if col.fmt or not len(values):
            df[col.key] = pd.to_numeric(df[col.key]) if col.fmt else df[col.key]
        elif all(isinstance(v, int) for v in values):
            df[col.key] = df[col.key].astype("Int64")
    return df


def build_table(records: Sequence[RunRecord], columns: Sequence[Column] = COLUMNS) -> pd.DataFrame:
    """One row per run; optional columns appear only when at least one run has a value."""
    df = _cell_values(records, columns)
    keep = [c.key for c in columns if c.always or df[c.key].notna().any()]
    return df[keep]


def format_value(value: Any, fmt: str, missing: str = MISSING) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    if isinstance(value, float) and fmt:
        return format(value, fmt)
    return str(value)


def _formatted(df: pd.DataFrame, columns: Sequence[Column]) -> pd.DataFrame:
    """Every cell as printed: the column's number format, MISSING for no value."""
    by_key = {c.key: c for c in columns}
    return pd.DataFrame(
        {key: [format_value(v, by_key[key].fmt) for v in df[key]] for key in df.columns}, index=df.index
    ).rename(columns={key: by_key[key].title for key in df.columns})


# ---------------------------------------------------------------------------------------------
# Groups: repeats of one configuration (a sweep point over seeds)


def config_key(record: RunRecord) -> tuple:
    params = tuple(sorted((k, v) for k, v in record.params.items() if not k.startswith(_NOT_CONFIG_PARAMS)))
    return (record.tags.get(PARENT_TAG, ""), record.method, params)


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


def group_labels(records: Sequence[RunRecord]) -> list[str]:
    """Each run's group: same parent and same config except seed, labelled by what sets it apart."""
    keys = [config_key(r) for r in records]
    distinct = list(dict.fromkeys(keys))
    varying = [n for n in _varying_params(distinct) if n != "loss.name"]
    if len({k[1] for k in distinct}) > 1:
        varying.insert(0, "loss.name")
    modal = _modal_values(distinct, varying)
    labels = {k: _group_label(k, varying, modal) for k in distinct}
    return [labels[k] for k in keys]


def build_group_table(records: Sequence[RunRecord], table_columns: Sequence[Column]) -> pd.DataFrame:
    """Per group: finished and failed run counts, and mean / sample std of every aggregated column
    over the FINISHED runs (failed runs are counted, not averaged). Columns `<key>_mean`, `<key>_std`."""
    aggregated = [c.key for c in table_columns if c.aggregate]
    df = _cell_values(records, [c for c in table_columns if c.aggregate])
    df = df.astype("float64")
    df["group"] = group_labels(records)
    df["method"] = [r.method for r in records]
    df["finished"] = [r.status == "FINISHED" for r in records]
    df["run_id"] = [r.run_id for r in records]
    grouped = df.groupby("group", sort=False)
    out = grouped.agg(
        method=("method", "first"),
        runs=("finished", "sum"),
        total=("finished", "size"),
        run_ids=("run_id", " ".join),
    )
    out["failed"] = out.pop("total") - out["runs"]
    stats = df[df["finished"]].groupby("group", sort=False)[aggregated].agg(["mean", "std"])
    stats.columns = [f"{key}_{stat}" for key, stat in stats.columns]
    out = out.join(stats).reset_index()
    return out[["group", "method", "runs", "failed", "run_ids", *stats.columns]]


def _pm(mean: float | None, std: float | None, fmt: str) -> str:
    if mean is None or not math.isfinite(mean):
        return MISSING
    spread = "" if std is None or not math.isfinite(std) else f" ± {format_value(std, fmt)}"
    return format_value(mean, fmt) + spread


def formatted_groups(groups: pd.DataFrame, table_columns: Sequence[Column]) -> pd.DataFrame:
    cells = groups[["group", "method", "runs", "failed"]].astype(str)
    for col in table_columns:
        if col.aggregate and f"{col.key}_mean" in groups:
            cells[col.title] = [
                _pm(m, s, col.fmt) for m, s in zip(groups[f"{col.key}_mean"], groups[f"{col.key}_std"])
            ]
    return cells


# ---------------------------------------------------------------------------------------------
# Rendering: tabulate (what pandas' own to_markdown uses) for text and Markdown, pandas for CSV


def render_text(cells: pd.DataFrame) -> str:
    return cells.to_markdown(index=False, tablefmt="simple", disable_numparse=True)


def render_markdown(cells: pd.DataFrame) -> str:
    escaped = cells.map(lambda c: c.replace("|", "\\|"))
    return escaped.to_markdown(index=False, tablefmt="pipe", disable_numparse=True)


def table_csv(table: pd.DataFrame) -> str:
    """Full-precision values; an empty cell is a missing value."""
    return table.to_csv(index=False, lineterminator="\n")


def groups_csv(groups: pd.DataFrame) -> str:
    return groups.to_csv(index=False, lineterminator="\n")
