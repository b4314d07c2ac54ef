"""What a user sees first on a run's MLflow page: the charts of the training loss, eval, τ, throughput.

MLflow's run page lays out its "Model metrics" charts from the metric names alone. `run_page_sections`
re-implements that rule from MLflow's UI source (MLflow 3.17,
mlflow/server/js/src/experiment-tracking/components/runs-charts/runs-charts.types.ts:
RunsChartsCardConfig.extractChartSectionName and getBaseChartAndSectionConfigs, used by
run-page/RunViewMetricChartsV2.tsx): a chart's section is its metric name up to the last "/"; an
unprefixed name goes to "Model metrics" and "system/..." to "System metrics"; the other sections are
sorted with JavaScript's default sort (UTF-16 code units: for these ASCII names, Python's sort), then
come "Model metrics" and "System metrics"; charts within a section are sorted by metric name.
benchmarks/mlflow_screenshots.py checks the same order in a real browser.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_tempnet import metric_names as names
from dist_tempnet.config import ConfigError, load_config
from dist_tempnet.data import make_demo_clip_dataset
from tests._dist import run_distributed

MODEL_METRICS, SYSTEM_METRICS = "Model metrics", "System metrics"


def _section(key: str) -> str:
    prefix = "/".join(key.split("/")[:-1])
    if prefix == "":
        return MODEL_METRICS
    if prefix + "/" == "system/":
        return SYSTEM_METRICS
    return prefix


def run_page_sections(keys: list[str]) -> list[tuple[str, list[str]]]:
    """(section, its charts' metric names) in the order MLflow's run page shows the model metrics."""
    model = [k for k in keys if not k.startswith("system/")]
    found = {_section(k) for k in model}
    order = sorted(found - {MODEL_METRICS}) + ([MODEL_METRICS] if MODEL_METRICS in found else [])
    return [(s, sorted(k for k in model if _section(k) == s)) for s in order]


def test_rule_on_the_names_before_this_layout():
    """The rule reproduces the order measured in a browser with the old names (issue 13): the plain
    `loss` came last, after data, eval, loss, lr, tau and train_tau."""
    old = ["loss", "samples_per_s", "gamma", "data/skipped_samples", "eval/zero_shot_acc", "loss/objective"]
    old += ["lr/model", "tau/image_p50", "train_tau/image_p50", "system/cpu_utilization_percentage"]
    sections = [s for s, _ in run_page_sections(old)]
    assert sections == ["data", "eval", "loss", "lr", "tau", "train_tau", MODEL_METRICS]


def _train(rank: int, world: int, data: str, root: str, uri: str, run_id: str) -> dict:
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"
    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.spec import WorkerSpec
    from dist_tempnet.runtime.trainer import Trainer

    cfg = load_config(None, [
        f"data.path={data}", "data.demo=false", "data.image_size=16", "data.shuffle_buffer=0",
        "loss.name=isogclr_tempnet", "ray.num_workers=1", "train.global_batch_size=16",
        "train.micro_batch_size=16", "train.steps=4", "train.log_every=1", "eval.every=2",
        "eval.max_batches=1", f"run.output_dir={root}",
    ])  # fmt: skip
    trainer = Trainer(
        cfg, WorkerSpec(cfg.to_dict(), tracking_uri=uri, mlflow_run_id=run_id), LocalSink(Path(root), 1)
    )
    return trainer.fit()


def test_run_page_opens_on_loss_eval_tau_throughput(tmp_path):
    """A real tiny iSogCLR + TempNet run: its logged names, laid out by MLflow's rule, put the training
    loss first, then eval, the τ spread and throughput; every diagnostic comes after those."""
    from mlflow.tracking import MlflowClient

    data = make_demo_clip_dataset(
        tmp_path / "clip", num_train=64, num_eval=16, image_size=16, samples_per_shard=16
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("layout")).info.run_id
    run_distributed(_train, 1, str(data), str(tmp_path / "runs"), uri, run_id, timeout=600)
    keys = list(client.get_run(run_id).data.metrics)
    layout = run_page_sections(keys)
    sections = [s for s, _ in layout]
    assert sections[:4] == ["batch", "eval", "tau", "throughput"], sections
    assert layout[0][1] == [names.LOSS], "the first chart is the training loss"
    assert "eval/zero_shot_acc" in layout[1][1] and "eval/i2t_recall_at_1" in layout[1][1]
    assert {"tau/image_p10", "tau/image_p50", "tau/image_p90", "tau/image_at_min"} <= set(layout[2][1])
    assert layout[3][1] == [names.per_s("samples"), names.per_s_per_worker("samples")]
    later = {k for _, charts in layout[4:] for k in charts}
    for diagnostic in ("train/lr/tempnet", names.SKIPPED_SAMPLES, "train/loss_internals/objective"):
        assert diagnostic in later
    assert {"train/tau/image_mean", "train_tau/image_p50", "gamma", "train_time_s"} <= later
    # Each quantity once: no name of the old layout is logged besides its new one.
    assert not [k for k in keys if names.renamed(k)], keys
    # Plain lowercase section names: MLflow's later re-sort (localeCompare) keeps the same order.
    assert all(s.replace("_", "").isalpha() and s.islower() for s in sections[:4])


@pytest.mark.parametrize("old", ["loss", "samples_per_s", "lr/model", "loss/objective", "tau/image_mean"])
def test_keep_best_metric_with_an_old_name_is_refused(old):
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_best_metric.*is now logged as"):
        load_config(None, [f"checkpoint.keep_best_metric={old}"])


def test_compare_reads_runs_logged_with_the_old_names():
    from dist_tempnet.reporting.runs import canonical_metric_name

    assert canonical_metric_name("loss") == "batch/loss"
    assert canonical_metric_name("samples_per_s") == "throughput/samples_per_s"
    assert canonical_metric_name("tau/image_mean") == "train/tau/image_mean"
    assert canonical_metric_name("tau/image_p50") == "tau/image_p50"  # not renamed
    assert canonical_metric_name("eval/i2t_recall_at_1") == "eval/i2t_recall@1"
