"""`dist-tempnet compare` on a real MLflow SQLite store filled through the MLflow API."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from dist_tempnet.commands import cli  # noqa: E402
from dist_tempnet.reporting.compare import (  # noqa: E402
    COMPARISON_TAG,
    SWEEP_TAG,
    CompareError,
    compare,
    make_client,
    select_runs,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000_000  # ms


def _params(method: str, seed: int, steps: int = 20, **extra: str) -> dict[str, str]:
    return {
        "loss.name": method,
        "run.seed": str(seed),
        "run.name": f"{method}-{seed}",
        "train.steps": str(steps),
        "model.preset": "clip_tiny",
        "deepspeed.zero_stage": "2",
        "world_size": "2",
        **extra,
    }


def _tau(step_values: list[tuple[int, float, float, float]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for step, lo, mean, hi in step_values:
        for side in ("image", "text"):
            out.setdefault(f"train/tau/{side}_min", []).append((step, lo))
            out.setdefault(f"train/tau/{side}_mean", []).append((step, mean))
            out.setdefault(f"train/tau/{side}_max", []).append((step, hi))
        out.setdefault("tau/mean", []).append((step, mean))
    return out


def _make_run(
    client, exp_id, name, method, seed, status, start_s, end_s, metrics, params, parent=None, extra_tags=None
) -> str:
    tags = {
        "mlflow.runName": name,
        "task": "clip",
        "method": method,
        "model": "clip_tiny",
        "world_size": "2",
        "zero_stage": "2",
        **(extra_tags or {}),
    }
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, start_time=T0 + start_s * 1000, tags=tags)
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    batch = [
        Metric(key, value, T0 + (start_s + step) * 1000, step)
        for key, points in metrics.items()
        for step, value in points
    ]
    client.log_batch(rid, metrics=batch)
    client.set_terminated(rid, status, end_time=T0 + end_s * 1000 if end_s is not None else None)
    return rid


def _clip_metrics(
    loss_end: float, zs: float, r1: float, tau_end: float
) -> dict[str, list[tuple[int, float]]]:
    return {
        "batch/loss": [(10, 3.0), (20, loss_end)],
        "throughput/samples_per_s": [(10, 50.0), (20, 200.0)],  # the first window is left out of the mean
        "eval/zero_shot_acc": [(20, zs)],
        "eval/zero_shot_chance": [(20, 0.1)],
        # '@' is not allowed in MLflow metric names: the two spellings training may use.
        "eval/i2t_recall_at_1": [(20, r1)],
        "eval/t2i_recall_1": [(20, r1 / 2)],
        **_tau([(10, 0.01, 0.02, 0.04), (20, tau_end / 2, tau_end, tau_end * 2)]),
    }


def _png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.hist([0.01, 0.02, 0.02, 0.03])
    fig.savefig(path)
    plt.close(fig)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlstore")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("exp", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(
        exp_id, start_time=T0, tags={"mlflow.runName": "sweep", SWEEP_TAG: "sweep"}
    ).info.run_id
    ids = {
        "clip-0": _make_run(
            client,
            exp_id,
            "clip-0",
            "clip",
            0,
            "FINISHED",
            0,
            100,
            _clip_metrics(2.0, 0.5, 0.25, 0.07),
            _params("clip", 0),
            parent,
        ),
        "clip-1": _make_run(
            client,
            exp_id,
            "clip-1",
            "clip",
            1,
            "FINISHED",
            200,
            300,
            _clip_metrics(1.0, 0.7, 0.75, 0.07),
            _params("clip", 1),
            parent,
        ),
        "tn-0": _make_run(
            client,
            exp_id,
            "tn-0",
            "isogclr_tempnet",
            0,
            "FINISHED",
            400,
            520,
            _clip_metrics(1.5, 0.6, 0.5, 0.02),
            _params("isogclr_tempnet", 0),
            parent,
        ),
        "tn-1": _make_run(
            client,
            exp_id,
            "tn-1",
            "isogclr_tempnet",
            1,
            "FAILED",
            600,
            630,
            {"batch/loss": [(10, 2.5)], **_tau([(10, 0.01, 0.03, 0.05)])},
            _params("isogclr_tempnet", 1),
            parent,
        ),
        # No eval, no τ, no throughput: every such cell must read as missing.
        "bare": _make_run(
            client,
            exp_id,
            "bare",
            "sogclr",
            0,
            "FINISHED",
            700,
            710,
            {"batch/loss": [(5, 4.0)]},
            _params("sogclr", 0, steps=5),
        ),
    }
    client.log_artifact(ids["tn-0"], str(_png(root / "tau_histogram.png")))
    client.set_terminated(parent, "FINISHED", end_time=T0 + 800_000)
    return {"uri": uri, "client": client, "ids": ids, "parent": parent, "root": root}


EXPECTED_CSV = """\
run_name,run_id,method,model,world_size,zero_stage,seed,steps,last_step,status,wall_time_s,samples_per_s,loss,\
zero_shot_acc,zero_shot_chance,i2t_recall@1,t2i_recall@1,tau_mean,tau_min,tau_max
clip-0,{clip-0},clip,clip_tiny,2,2,0,20,20,FINISHED,100.0,200.0,2.0,0.5,0.1,0.25,0.125,0.07,0.035,0.14
clip-1,{clip-1},clip,clip_tiny,2,2,1,20,20,FINISHED,100.0,200.0,1.0,0.7,0.1,0.75,0.375,0.07,0.035,0.14
tn-0,{tn-0},isogclr_tempnet,clip_tiny,2,2,0,20,20,FINISHED,120.0,200.0,1.5,0.6,0.1,0.5,0.25,0.02,0.01,0.04
tn-1,{tn-1},isogclr_tempnet,clip_tiny,2,2,1,20,10,FAILED,30.0,,2.5,,,,,0.03,0.01,0.05
bare,{bare},sogclr,clip_tiny,2,2,0,5,5,FINISHED,10.0,,4.0,,,,,,,
"""


def test_table_csv_exact(store, tmp_path):
    client = store["client"]
    runs = select_runs(client, experiment="exp")
    comparison = compare(client, runs, tmp_path, plots=False)
    assert (tmp_path / "table.csv").read_text() == EXPECTED_CSV.format(**store["ids"])
    text = comparison.text()
    assert "FAILED" in text and "sweep" not in text.split("\n")[2]  # the parent is not a row
    bare_line = next(line for line in text.splitlines() if line.startswith("bare"))
    assert bare_line.split()[-4:] == ["-", "-", "-", "-"] or bare_line.rstrip().endswith("-")
    md = (tmp_path / "table.md").read_text()
    # Markdown cells are padded to the column width.
    assert re.search(r"\| clip-0 +\|", md) and re.search(r"\| - +\|", md)


def test_groups_mean_std(store, tmp_path):
    client = store["client"]
    compare(client, select_runs(client, experiment="exp"), tmp_path, plots=False)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "groups.csv").read_text())))
    by_label = {r["group"]: r for r in rows}
    assert set(by_label) == {"loss.name=clip", "loss.name=isogclr_tempnet", "loss.name=sogclr train.steps=5"}
    clip = by_label["loss.name=clip"]
    assert (clip["runs"], clip["failed"]) == ("2", "0")
    assert float(clip["loss_mean"]) == pytest.approx(1.5)
    assert float(clip["loss_std"]) == pytest.approx(math.sqrt(0.5))
    assert float(clip["zero_shot_acc_mean"]) == pytest.approx(0.6)
    assert float(clip["zero_shot_acc_std"]) == pytest.approx(math.sqrt(0.02))
    tn = by_label["loss.name=isogclr_tempnet"]
    # The failed seed is counted but not averaged: one finished run has no std.
    assert (tn["runs"], tn["failed"], tn["loss_mean"], tn["loss_std"]) == ("1", "1", "1.5", "")


def test_selection_by_ids_filter_and_parent(store):
    client, ids = store["client"], store["ids"]
    by_filter = select_runs(client, filter_string="tags.method = 'clip'")
    assert [r.info.run_id for r in by_filter] == [ids["clip-0"], ids["clip-1"]]
    by_parent = select_runs(client, run_ids=[store["parent"]])
    assert {r.info.run_id for r in by_parent} == {ids[k] for k in ("clip-0", "clip-1", "tn-0", "tn-1")}
    with pytest.raises(CompareError, match="no MLflow experiment named 'nope'"):
        select_runs(client, experiment="nope")
    with pytest.raises(CompareError, match="not found"):
        select_runs(client, run_ids=["0" * 32])


def test_bad_filter_is_one_line(store, capsys):
    assert cli.main(["compare", "--tracking-uri", store["uri"], "--filter", "tags.method === 'clip'"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dist-tempnet compare: MLflow refused the query") and "Traceback" not in err


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(CompareError, match="no MLflow store"):
        make_client(f"sqlite:///{tmp_path / 'absent.db'}")


def test_cli_writes_plots_and_logs_comparison(store, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = cli.main(
        [
            "compare",
            "--tracking-uri",
            store["uri"],
            "--experiment",
            "exp",
            "--out",
            str(out),
            "--log-to-mlflow",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Per configuration" in printed and "± " in printed
    for name in (
        "loss_vs_step.png",
        "eval_vs_step.png",
        "eval_vs_wall_time.png",
        "tau_vs_step.png",
        "tau_final.png",
        "tau_histograms.png",
    ):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, name
    client = store["client"]
    logged = client.search_runs(
        [client.get_experiment_by_name("exp").experiment_id],
        filter_string=f"tags.`{COMPARISON_TAG}` = 'true'",
    )
    assert len(logged) == 1
    artifacts = {a.path for a in client.list_artifacts(logged[0].info.run_id, "comparison")}
    assert {"comparison/table.csv", "comparison/loss_vs_step.png"} <= artifacts
    # The comparison run itself never shows up in a later comparison.
    assert len(select_runs(client, experiment="exp")) == 5


# ---------------------------------------------------------------------------------------------
# Sweep: grid parsing and validation (before anything runs), parent/child runs, the final table

from dist_tempnet.config import ConfigError  # noqa: E402
from dist_tempnet.driver import sweep  # noqa: E402


def test_grid_expansion_order_and_values():
    axes = sweep.parse_grid(
        ["loss.name=clip,isogclr_tempnet", "run.seed=0,1", "train.betas=[0.9,0.98],[0.8,0.9]"]
    )
    assert [a.key for a in axes] == ["loss.name", "run.seed", "train.betas"]
    assert axes[2].values == ("[0.9,0.98]", "[0.8,0.9]")
    points = sweep.expand_grid(axes)
    assert len(points) == 8
    assert points[0].label == "loss.name=clip,run.seed=0,train.betas=[0.9,0.98]"
    assert (
        points[1].label == "loss.name=clip,run.seed=0,train.betas=[0.8,0.9]"
    )  # the last axis varies fastest
    assert points[-1].overrides == ["loss.name=isogclr_tempnet", "run.seed=1", "train.betas=[0.8,0.9]"]


@pytest.mark.parametrize(
    ("grid", "sets", "message"),
    [
        (["loss.nme=clip,isogclr"], [], "unknown key 'loss.nme'"),
        (["loss.name=clip,nosuchloss"], [], "loss.name: must be one of"),
        (["run.seed=0,1", "run.seed=2"], [], "key 'run.seed' is given twice"),
        (["run.seed=0,,1"], [], "empty value"),
        (["run.seed=0,0"], [], "listed twice"),
        (["run.seed=0,1"], ["run.seed=3"], "'run.seed' is both in --grid and --set"),
        (["mlflow.experiment=a,b"], [], "cannot vary inside one sweep"),
        (["run.name=a,b"], [], "set by the sweep"),
        (["run.seed=0,1"], ["mlflow.enabled=false"], "records its runs in MLflow"),
        (["seed=0,1"], [], "key must be dotted"),
        (["train.betas=[0.9,0.98],[0.8"], [], "'train.betas': value '\\[0.8' is not valid YAML"),
        (["run.seed=0,1"], ["train.stepz=3"], "unknown key 'train.stepz'"),
    ],
)
def test_bad_grid_fails_before_anything_runs(grid, sets, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        sweep.plan_sweep(None, grid, sets)


def test_bad_grid_cli_exits_2_without_creating_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["sweep", "--grid", "loss.nme=clip,isogclr_tempnet", "run.seed=0,1"]) == 2
    assert "unknown key 'loss.nme'" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_each_point_gets_its_own_run_name():
    plan = sweep.plan_sweep(
        None, ["loss.name=clip,isogclr_tempnet", "run.seed=0,1"], ["train.steps=3"], name="s"
    )
    names = [c.run.name for c in plan.configs]
    assert len(set(names)) == 4  # Ray resumes a run of the same name: points must never share one
    assert [c.mlflow.run_name for c in plan.configs][1] == "s/loss.name=clip,run.seed=1"
    assert all(c.train.steps == 3 for c in plan.configs)
    assert [(c.loss.name, c.run.seed) for c in plan.configs] == [
        ("clip", 0),
        ("clip", 1),
        ("isogclr_tempnet", 0),
        ("isogclr_tempnet", 1),
    ]


def _stub_training(cfg, use_ray: bool = True):
    """Stands in for launcher.run_training: a real MLflow run with metrics, no model."""
    from dist_tempnet.driver.launcher import RunSummary
    from dist_tempnet.runtime.tracking import Tracker, start_run

    uri, run_id = start_run(cfg, cfg.ray.num_workers)
    tracker = Tracker(uri, run_id)
    if cfg.loss.name == "sogclr":
        tracker.terminate("FAILED")
        raise RuntimeError("worker died")
    base = 1.0 if cfg.loss.name == "clip" else 0.5
    tracker.log_metrics(
        {"batch/loss": base + cfg.run.seed, "tau/mean": 0.02, "throughput/samples_per_s": 10.0}, 1
    )
    tracker.log_metrics(
        {"batch/loss": base + cfg.run.seed / 10, "eval/zero_shot_acc": 0.1 * (cfg.run.seed + 1)}, 2
    )
    tracker.terminate("FINISHED")
    return RunSummary(run_id, uri)


def test_sweep_parent_children_and_table(monkeypatch, tmp_path, capsys):
    from dist_tempnet.driver import launcher

    monkeypatch.setattr(launcher, "run_training", _stub_training)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = cli.main(
        [
            "sweep",
            "--name",
            "s1",
            "--grid",
            "loss.name=clip,sogclr,isogclr_tempnet",
            "run.seed=0,1",
            "--set",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=sw",
        ]
    )
    assert rc == 1  # the sogclr points failed; the others still ran
    out = capsys.readouterr().out
    assert "loss.name=clip" in out and "1.0500 ± 0.0707" in out  # clip final losses 1.0, 1.1
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sw")
    parent = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 's1'")[0]
    assert parent.info.status == "FAILED"
    children = select_runs(client, run_ids=[parent.info.run_id])
    assert len(children) == 6
    assert sorted(c.info.status for c in children).count("FAILED") == 2
    assert {c.data.tags["mlflow.runName"] for c in children} >= {"s1/loss.name=isogclr_tempnet,run.seed=1"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} >= {
        "comparison/table.csv"
    }


# ---------------------------------------------------------------------------------------------
# End to end: a real 2×2 sweep (DeepSpeed + MLflow, in-process), then `compare` on its store


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    import os
    import subprocess
    import sys

    tiny = [
        "train.steps=4",
        "train.log_every=2",
        "train.warmup_steps=0",
        "data.demo_num_train=512",
        "data.demo_num_eval=128",
        "eval.max_batches=1",
        "ray.num_workers=1",
        "train.global_batch_size=64",
        "train.micro_batch_size=64",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_tempnet.commands.cli",
            "sweep",
            "--name",
            "e2e",
            "--grid",
            "loss.name=clip,isogclr_tempnet",
            "run.seed=0,1",
            "--set",
            *tiny,
            "--out",
            "cmp",
            # Every point in this process: the Ray path of a training run is test_e2e's; here it
            # would only add a Ray start and a worker group per point.
            "--no-ray",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("=== sweep e2e") :]
    assert "loss.name=clip " in table and "loss.name=isogclr_tempnet " in table and " ± " in table
    rows = list(csv.DictReader(io.StringIO((tmp_path / "cmp" / "table.csv").read_text())))
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == [
        ("clip", "0", "FINISHED"),
        ("clip", "1", "FINISHED"),
        ("isogclr_tempnet", "0", "FINISHED"),
        ("isogclr_tempnet", "1", "FINISHED"),
    ]
    for r in rows:
        assert r["world_size"] == "1" and r["last_step"] == "4"
        assert 0.0 <= float(r["zero_shot_acc"]) <= 1.0 and float(r["i2t_recall@10"]) > 0
        assert float(r["tau_min"]) <= float(r["tau_mean"]) * (1 + 1e-5)
    tempnet_runs = [r for r in rows if r["method"] == "isogclr_tempnet"]
    assert all(0.005 <= float(r["tau_min"]) and float(r["tau_max"]) <= 0.05 for r in tempnet_runs)
    for png in ("loss_vs_step.png", "eval_vs_step.png", "tau_vs_step.png", "tau_histograms.png"):
        assert (tmp_path / "cmp" / png).read_bytes()[:8] == PNG_MAGIC
    # `compare` with no arguments, in this process (no second interpreter to import torch): the store
    # of the working directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    capsys.readouterr()
    assert cli.main(["compare", "--no-plots"]) == 0
    assert capsys.readouterr().out.count("FINISHED") == 4
