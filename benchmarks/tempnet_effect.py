"""Does TempNet help here? CLIP InfoNCE vs iSogCLR vs iSogCLR + TempNet on long-tailed demo data,
and the LM with and without TempNet on the demo corpus, at equal budget over several seeds.

    python benchmarks/tempnet_effect.py                       # the default grid (CPU, 15 runs)
    python benchmarks/tempnet_effect.py --seeds 0,1,2,3,4 --out results/
    python benchmarks/tempnet_effect.py --tiny                # a smoke run in about a minute (CI)

Every run is an ordinary training run of this project, trained in this process (one rank, no Ray),
recorded in MLflow as a child of one sweep parent run (`driver.sweep`). CLIP: configs/
clip_tiny_longtail.yaml (Zipf class frequencies, noisy and generic captions, a balanced held-out
split), with the global batch in one micro batch so the loss sees the same n as with 2 workers. LM:
configs/lm_tiny_scratch.yaml (TempNet) against loss.name=ce, at a quarter of its steps. The title line
says how long it took in wall and in CPU time (on a shared machine the wall time says little alone).
The script ends with the sweep's `compare` table and a focused table, mean ± std over seeds:

- CLIP: zero-shot accuracy overall and on the rarest third of classes, image→text and text→image
  R@1, the spread of τ (p10/p50/p90, image side) and Spearman's correlation between a sample's τ and
  its class frequency (held out for TempNet; over the last trained samples for iSogCLR, whose τ lives
  in per-sample state);
- LM: held-out perplexity (at τ = 1, and with TempNet's τ), τ spread, Spearman's correlation of a
  token's τ with the predictive entropy of its logits and with its target token's frequency.

The focused table is also written as markdown to --out (if given) and logged on the parent run.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIP_CONFIG = REPO / "configs" / "clip_tiny_longtail.yaml"
LM_CONFIG = REPO / "configs" / "lm_tiny_scratch.yaml"
CLIP_METHODS = ("clip", "isogclr", "isogclr_tempnet")
LM_METHODS = ("ce", "tempnet")

# In this process there is one rank: the whole global batch in one micro batch (the DRO loss then
# sees n = global batch, as with 2 workers of 32).
CLIP_SETTINGS = ["ray.num_workers=1", "train.micro_batch_size=64"]
# The LM at a quarter of lm_tiny_scratch.yaml's steps (freeze and warm-up scaled alike), so the default
# grid (15 runs) fits in about 20 minutes on 2 CPU cores.
LM_SETTINGS = [
    "ray.num_workers=1",
    "train.micro_batch_size=16",
    "train.steps=50",
    "train.warmup_steps=5",
    "train.log_every=10",
    "loss.tempnet_freeze_steps=10",
]
TINY_CLIP = [
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.global_batch_size=32",
    "train.micro_batch_size=32",
    "data.demo_num_train=288",
    "data.demo_num_eval=72",
    "data.image_size=16",
]
TINY_LM = [
    "train.steps=4",
    "train.warmup_steps=1",
    "train.log_every=2",
    "train.global_batch_size=4",
    "train.micro_batch_size=4",
    "data.seq_len=32",
    "eval.max_batches=4",
]


@dataclass(frozen=True)
class Shown:
    """One column of the focused table: a logged metric, shown as mean ± std over seeds."""

    key: str
    title: str
    fmt: str


CLIP_COLUMNS = (
    Shown("eval/zero_shot_acc", "zero-shot acc", ".3f"),
    Shown("eval/zero_shot_acc_tail", "zero-shot acc, rarest third", ".3f"),
    Shown("eval/i2t_recall@1", "i2t R@1", ".3f"),
    Shown("eval/t2i_recall@1", "t2i R@1", ".3f"),
    Shown("tau_p10", "τ p10", ".4f"),
    Shown("tau_p50", "τ p50", ".4f"),
    Shown("tau_p90", "τ p90", ".4f"),
    Shown("tau_freq_spearman", "Spearman(τ, class freq)", "+.2f"),
)
LM_COLUMNS = (
    Shown("eval/ppl", "held-out ppl (τ=1)", ".2f"),
    Shown("eval/ppl_tempnet", "held-out ppl (TempNet τ)", ".2f"),
    Shown("eval/tau_p10", "τ p10", ".3f"),
    Shown("eval/tau_p50", "τ p50", ".3f"),
    Shown("eval/tau_p90", "τ p90", ".3f"),
    Shown("eval/tau_entropy_spearman", "Spearman(τ, entropy)", "+.2f"),
    Shown("eval/tau_freq_spearman", "Spearman(τ, token freq)", "+.2f"),
)


def clip_value(metrics: dict[str, float], key: str) -> float | None:
    """A CLIP column's value; τ columns take the held-out TempNet τ when there is one, else the
    τ of the last trained samples (iSogCLR), else the global τ (InfoNCE)."""
    from dist_tempnet import metric_names as names

    if key.startswith("tau_p"):
        q = key.removeprefix("tau_")
        for name in (f"eval/tau_image_{q}", f"train_tau/image_{q}"):
            if name in metrics:
                return metrics[name]
        return metrics.get(f"{names.TAU_SIDE}image_mean")
    if key == "tau_freq_spearman":
        return metrics.get("eval/tau_freq_spearman_image", metrics.get("train_tau/freq_spearman_image"))
    return metrics.get(key)


def plan(args: argparse.Namespace):
    """The sweep: every (part, method, seed) as one validated Config under one grid."""
    from dist_tempnet.config import load_config
    from dist_tempnet.driver.sweep import GridAxis, GridPoint, SweepPlan

    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    clip_extra = CLIP_SETTINGS + (TINY_CLIP if args.tiny else [])
    clip_extra += [f"train.steps={args.clip_steps}"] if args.clip_steps else []
    lm_extra = LM_SETTINGS + (TINY_LM if args.tiny else [])
    lm_extra += [f"train.steps={args.lm_steps}"] if args.lm_steps else []
    common = [f"run.output_dir={args.workdir}/runs", f"mlflow.tracking_uri={args.tracking_uri}"]
    common.append(f"mlflow.experiment={args.experiment}")
    entries = []
    if "clip" in args.parts:
        data = [f"data.path={args.workdir}/data/clip_longtail"]
        entries += [(f"clip/{m}", CLIP_CONFIG, [*clip_extra, *data, f"loss.name={m}"]) for m in CLIP_METHODS]
    if "lm" in args.parts:
        data = [f"data.path={args.workdir}/data/demo_text"]
        entries += [(f"lm/{m}", LM_CONFIG, [*lm_extra, *data, f"loss.name={m}"]) for m in LM_METHODS]
    name = f"tempnet-effect-{time.strftime('%Y%m%d-%H%M%S')}"
    axes = [GridAxis("run.seed", tuple(seeds)), GridAxis("bench", tuple(e[0] for e in entries))]
    points, configs = [], []
    # Seed by seed, every method per seed: a grid stopped early still compares the methods.
    for seed in seeds:
        for label, config, overrides in entries:
            point = GridPoint(len(points), (("run.seed", seed), ("bench", label)))
            cfg = load_config(config, [*overrides, *common, f"run.seed={seed}"])
            # The data are built once per part (seed 0's draw) and shared by all seeds and methods.
            cfg.data.demo = True
            cfg.run.name = f"{name}-{point.index:03d}-{label.replace('/', '-')}-seed{seed}"
            cfg.mlflow.run_name = f"{name}/{point.label}"
            points.append(point)
            configs.append(cfg)
    base = configs[0]
    return SweepPlan(name, common, axes, points, base, configs), [label for label, _, _ in entries]


def focused_tables(client, parent_id: str, labels: list[str]) -> str:
    """Markdown tables (mean ± std over the finished seeds) of the sweep's children, by method."""
    import statistics

    from dist_tempnet.driver.sweep import POINT_TAG
    from dist_tempnet.reporting.runs import canonical_metric_name, select_runs

    runs = [r for r in select_runs(client, run_ids=[parent_id]) if r.info.status == "FINISHED"]
    by_label: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    for run in runs:
        point = dict(
            part.split("=", 1) for part in run.data.tags.get(POINT_TAG, "").split(",") if "=" in part
        )
        label = point.get("bench", "")
        metrics = {canonical_metric_name(k): v for k, v in run.data.metrics.items()}
        by_label.setdefault(label, []).append(metrics)

    def cell(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        mean = format(statistics.fmean(values), fmt)
        return mean + (f" ± {format(statistics.stdev(values), fmt.lstrip('+'))}" if len(values) > 1 else "")

    out = []
    for part, columns, value in (("clip", CLIP_COLUMNS, clip_value), ("lm", LM_COLUMNS, dict.get)):
        rows = [label for label in labels if label.startswith(part + "/")]
        if not rows:
            continue
        header = ["method", "seeds", *[c.title for c in columns]]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label in rows:
            seeds = by_label.get(label, [])
            cells = [label.split("/", 1)[1], str(len(seeds))]
            for col in columns:
                values = [v for v in (value(m, col.key) for m in seeds) if v is not None and v == v]
                cells.append(cell(values, col.fmt))
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default: 0,1,2)")
    p.add_argument("--parts", default="clip,lm", help="clip, lm or both (default)")
    p.add_argument("--clip-steps", type=int, default=0, help="override the CLIP config's train.steps")
    p.add_argument("--lm-steps", type=int, default=0, help="override the LM config's train.steps")
    p.add_argument(
        "--tiny", action="store_true", help="a few steps on tiny data: checks the script, not TempNet"
    )
    p.add_argument("--workdir", default=None, help="data, run outputs and (by default) the MLflow store")
    p.add_argument("--tracking-uri", default="", help="MLflow store (default: sqlite in --workdir)")
    p.add_argument("--experiment", default="tempnet_effect")
    p.add_argument(
        "--out", type=Path, default=None, help="write compare tables, plots and the focused table here"
    )
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args.workdir = str(Path(args.workdir or tempfile.mkdtemp(prefix="dt-tempnet-effect-")).resolve())
    args.tracking_uri = args.tracking_uri or f"sqlite:///{args.workdir}/mlflow.db"
    args.parts = {part.strip() for part in args.parts.split(",")}
    if not args.parts <= {"clip", "lm"}:
        p.error(f"--parts takes clip and/or lm, got {sorted(args.parts)}")

    from mlflow.tracking import MlflowClient

    from dist_tempnet.driver.sweep import run_sweep

    sweep, labels = plan(args)
    t0 = time.perf_counter()
    parent_id, results = run_sweep(sweep, out=args.out, use_ray=False)
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = usage.ru_utime + usage.ru_stime  # wall time on a shared machine says little alone
    client = MlflowClient(tracking_uri=args.tracking_uri)
    tables = focused_tables(client, parent_id, labels)
    title = (
        f"Does TempNet help here? (mean ± std over seeds {args.seeds}; {seconds / 60:.1f} min wall, "
        f"{cpu_seconds / 60:.1f} min CPU)"
    )
    text = f"### {title}\n\n{tables}\n"
    client.log_text(parent_id, text, "tempnet_effect.md")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tempnet_effect.md").write_text(text)
    print(f"\n{text}", flush=True)
    print(
        f"wall time {seconds:.0f}s, CPU time {cpu_seconds:.0f}s, {len(results)} runs; "
        f"MLflow parent run {parent_id} ({args.tracking_uri})"
    )
    return 0 if results and all(not r.error for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
