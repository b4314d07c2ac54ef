"""`dist-tempnet sweep`: run a grid of configurations one after another under one MLflow parent run.

    dist-tempnet sweep --config cfg.yaml --grid loss.name=clip,isogclr_tempnet run.seed=0,1 \\
        --set train.steps=50

Every grid point is validated (as a full config) before anything runs, so a bad key fails in
seconds rather than after the first training run. Children are ordinary training runs tagged
`mlflow.parentRunId`, named after their grid point, and each gets its own `run.name` so that Ray's
"same name resumes the latest checkpoint" never makes one grid point continue another. At the end
the sweep prints the `compare` table with mean ± std over seeds, and logs it on the parent run.
"""

from __future__ import annotations

import itertools
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dist_tempnet.config import Config, ConfigError, load_config, parse_override
from dist_tempnet.reporting.compare import SWEEP_TAG

POINT_TAG = "dist_tempnet.sweep_point"


@dataclass(frozen=True)
class GridAxis:
    key: str
    values: tuple[str, ...]  # raw texts, parsed as YAML by load_config


@dataclass
class GridPoint:
    index: int
    assignments: tuple[tuple[str, str], ...]  # (dotted key, raw value)

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.assignments)

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.assignments]


def split_values(text: str) -> list[str]:
    """Split `a,b,[1,2],{x: 1}` at top-level commas only, so list and mapping values survive."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def _check_yaml(key: str, value: str) -> None:
    try:
        yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep --grid '{key}': value {value!r} is not valid YAML ({exc.problem})") from exc


def parse_grid(specs: Sequence[str]) -> list[GridAxis]:
    """`["loss.name=clip,isogclr_tempnet", "run.seed=0,1"]` → axes, in the order given."""
    axes: list[GridAxis] = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"sweep --grid '{spec}' must look like section.key=v1,v2,...")
        raw_key, _, values_text = spec.partition("=")
        key = ".".join(parse_override(raw_key + "=")[0])  # the same key rules as any override
        values = split_values(values_text)
        if any(v == "" for v in values):
            raise ConfigError(f"sweep --grid '{spec}': empty value in the list (use key=v1,v2,...)")
        for value in values:
            _check_yaml(key, value)
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep --grid '{spec}': a value is listed twice")
        if any(a.key == key for a in axes):
            raise ConfigError(f"sweep --grid: key '{key}' is given twice")
        axes.append(GridAxis(key, tuple(values)))
    if not axes:
        raise ConfigError("sweep needs at least one --grid key=v1,v2,...")
    return axes


def expand_grid(axes: Sequence[GridAxis]) -> list[GridPoint]:
    """Cartesian product, the first axis varying slowest."""
    combos = itertools.product(*[[(a.key, v) for v in a.values] for a in axes])
    return [GridPoint(i, tuple(combo)) for i, combo in enumerate(combos)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


@dataclass
class SweepPlan:
    name: str
    base_overrides: list[str]
    axes: list[GridAxis]
    points: list[GridPoint]
    base: Config  # the config without grid values
    configs: list[Config] = field(default_factory=list)


# One sweep = one experiment in one store; run names are the sweep's to assign.
_SHARED_KEYS = ("mlflow.experiment", "mlflow.tracking_uri", "mlflow.enabled")
_ASSIGNED_KEYS = ("run.name", "mlflow.run_name")


def plan_sweep(
    config_path: str | None, grid: Sequence[str], sets: Sequence[str] = (), name: str = ""
) -> SweepPlan:
    """Parse and validate everything up front: every grid point becomes a checked Config."""
    axes = parse_grid(grid)
    set_keys = {".".join(parse_override(s)[0]) for s in sets}
    for axis in axes:
        if axis.key in set_keys:
            raise ConfigError(f"sweep: '{axis.key}' is both in --grid and --set")
        if axis.key in _SHARED_KEYS or axis.key.startswith("mlflow.tags"):
            raise ConfigError(
                f"sweep: '{axis.key}' cannot vary inside one sweep (all runs share one experiment)"
            )
        if axis.key in _ASSIGNED_KEYS:
            raise ConfigError(f"sweep: '{axis.key}' is set by the sweep for each point (use --name)")
    points = expand_grid(axes)
    base = load_config(config_path, list(sets))
    if not base.mlflow.enabled:
        raise ConfigError("sweep: mlflow.enabled=false; a sweep records its runs in MLflow")
    sweep_name = name or f"{base.run.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = SweepPlan(sweep_name, list(sets), axes, points, base)
    for point in points:
        cfg = load_config(config_path, [*sets, *point.overrides])
        _name_child(cfg, plan.name, point)
        plan.configs.append(cfg)
    return plan


def _name_child(cfg: Config, sweep_name: str, point: GridPoint) -> None:
    cfg.run.name = _slug(f"{sweep_name}-{point.index:03d}-{point.label}")
    cfg.mlflow.run_name = f"{sweep_name}/{point.label}"


def _start_parent(plan: SweepPlan, client) -> str:
    from dist_tempnet.config import dump_config
    from dist_tempnet.runtime.tracking import git_commit

    cfg = plan.configs[0]
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.mlflow.experiment)
    run = client.create_run(
        exp_id,
        tags={
            "mlflow.runName": plan.name,
            SWEEP_TAG: plan.name,
            "task": cfg.run.task,
            "git_commit": git_commit(),
            "mlflow.source.name": "dist-tempnet sweep",
        },
    )
    run_id = run.info.run_id
    client.log_param(run_id, "sweep.points", len(plan.points))
    for axis in plan.axes:
        client.log_param(run_id, f"grid.{axis.key}", ",".join(axis.values))
    for text in plan.base_overrides:
        key, _, value = text.partition("=")
        client.log_param(run_id, f"set.{key}", value)
    client.log_text(run_id, dump_config(plan.base), "base_config.yaml")
    return run_id


@dataclass
class PointResult:
    point: GridPoint
    run_id: str = ""
    error: str = ""
    seconds: float = 0.0


def run_point(cfg: Config, point: GridPoint, parent_id: str, total: int, use_ray: bool = True) -> PointResult:
    """One grid point; `use_ray=False` trains in this process (one rank), like `train --no-ray`."""
    from dist_tempnet.driver.launcher import run_training

    if not use_ray:
        cfg.ray.num_workers = 1

    cfg.mlflow.tags = {**cfg.mlflow.tags, "mlflow.parentRunId": parent_id, POINT_TAG: point.label}
    print(f"\n[dist-tempnet sweep] point {point.index + 1}/{total}: {point.label}", flush=True)
    t0 = time.perf_counter()
    try:
        summary = run_training(cfg, use_ray=use_ray)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one failed point must not cancel the rest of the grid
        print(
            f"[dist-tempnet sweep] point {point.label} FAILED: {type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        return PointResult(point, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
    return PointResult(point, run_id=summary.run_id, seconds=time.perf_counter() - t0)


def _report(client, parent_id: str, out: Path | None) -> str:
    """The compare table of the sweep's children; also logged on the parent run."""
    from dist_tempnet.reporting.compare import compare, select_runs

    runs = select_runs(client, run_ids=[parent_id])
    with tempfile.TemporaryDirectory(prefix="dist-tempnet-sweep-") as tmp:
        target = out or Path(tmp)
        comparison = compare(client, runs, target, plots=out is not None)
        try:
            client.log_artifacts(parent_id, str(target), "comparison")
        except Exception as exc:  # noqa: BLE001 - the runs are done; a logging hiccup must not hide the table
            print(
                f"[dist-tempnet sweep] could not log the comparison on the parent run: {exc}", file=sys.stderr
            )
    return comparison.text()


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _stop_ray() -> None:
    # Shutting down flushes the workers' buffered log lines, so they print before the table, not into it.
    if _ray_is_up():
        sys.modules["ray"].shutdown()


def run_sweep(
    plan: SweepPlan, fail_fast: bool = False, out: Path | None = None, use_ray: bool = True
) -> tuple[str, list[PointResult]]:
    """Run every grid point in order; returns (parent run id, per-point results).

    `use_ray=False`: every point trains in this process, one rank (fast for tiny CPU grids).
    """
    from mlflow.tracking import MlflowClient

    from dist_tempnet.runtime.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(plan.configs[0].mlflow.tracking_uri)
    for cfg in plan.configs:
        cfg.mlflow.tracking_uri = uri  # one store for parent and children, whatever the working dir
    client = MlflowClient(tracking_uri=uri)
    parent_id = _start_parent(plan, client)
    print(
        f"[dist-tempnet sweep] {plan.name}: {len(plan.points)} runs, parent MLflow run {parent_id} ({uri})",
        flush=True,
    )
    results: list[PointResult] = []
    status = "FAILED"
    ray_was_up = _ray_is_up()
    try:
        for cfg, point in zip(plan.configs, plan.points):
            results.append(run_point(cfg, point, parent_id, len(plan.points), use_ray=use_ray))
            if fail_fast and results[-1].error:
                break
        status = (
            "FINISHED" if all(not r.error for r in results) and len(results) == len(plan.points) else "FAILED"
        )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_id, status)
        if not ray_was_up:
            _stop_ray()
    if any(r.run_id for r in results):
        print(f"\n=== sweep {plan.name} (parent run {parent_id}) ===", flush=True)
        print("\n".join(summary_lines(results)) + "\n", flush=True)
        print(_report(client, parent_id, out), flush=True)
    return parent_id, results


def summary_lines(results: Sequence[PointResult]) -> list[str]:
    return [
        f"  {r.point.label}: {'FAILED: ' + r.error if r.error else 'run ' + r.run_id} ({r.seconds:.0f}s)"
        for r in results
    ]
