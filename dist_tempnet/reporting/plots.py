"""The comparison plots: loss, eval metrics and τ over training, final τ, the runs' τ histograms."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dist_tempnet import metric_names as names
from dist_tempnet.reporting.runs import RunRecord
from dist_tempnet.reporting.table import _EVAL_COLUMNS, _final

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
    drawn = [r for r in records if _xy(r, names.LOSS, "step")[0]]
    if not drawn:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r in drawn:
        few_points = len(r.histories[names.LOSS]) < 20
        ax.plot(
            *_xy(r, names.LOSS, "step"),
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
    keys = {k for r in records for k, pts in r.histories.items() if k.startswith(names.EVAL) and pts}
    keys.discard(f"{names.EVAL}zero_shot_chance")
    order = [f"{names.EVAL}{k}" for k, _, _ in _EVAL_COLUMNS]
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
    sides = [(s, f"{names.TAU_SIDE}{s}_") for s in ("image", "text") if f"{names.TAU_SIDE}{s}_mean" in has]
    return sides or ([("τ", names.TAU)] if f"{names.TAU}mean" in has else [])


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
