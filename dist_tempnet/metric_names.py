"""The names of the logged metrics, in one place, chosen for the order MLflow shows them in.

MLflow 3.17's run page ("Model metrics" tab) lays its charts out by name only; nothing a client can
write on the server changes that (a chart layout the user drags around is kept in the browser's
localStorage). The rule (mlflow/server/js/src/experiment-tracking/components/runs-charts/
runs-charts.types.ts, RunsChartsCardConfig.getBaseChartAndSectionConfigs and extractChartSectionName):
a metric's section is its name up to the last "/"; sections are sorted alphabetically, except that
unprefixed names form the section "Model metrics", which comes last (then "system/…", System
metrics); within a section the charts are sorted by their full name.

So the prefixes below are picked to sort in the order people read a run: the training loss
("batch" — the loss of the step's global batch), the held-out evaluation ("eval"), the τ spread
("tau": p10/p50/p90 and the share of samples on a bound), throughput ("throughput"), and after those
the diagnostics, all under "train/…" or "train_tau" (learning rates, data skips, the loss's internals,
per-side τ mean/min/max, τ of the last trained samples). Timings, γ and counters stay unprefixed, in
the last section. Every name is plain lowercase, so the sort order is the same whether the UI sorts
by code unit (first layout) or with localeCompare (when a new section shows up later).
"""

from __future__ import annotations

LOSS = "batch/loss"  # the training loss (mean over the global batch of the step)
EVAL = "eval/"  # held-out metrics (retrieval recall, zero-shot accuracy, perplexity, held-out τ spread)
TAU = "tau/"  # τ spread of the step's samples: tau/mean, tau/[image_|text_]p10/p50/p90/at_min/at_max
THROUGHPUT = "throughput/"
LR = "train/lr/"  # + the parameter group's name
SKIPPED_SAMPLES = "train/data/skipped_samples"  # lost to corrupt data (data.allow_corrupt)
SKIPPED_SHARDS = "train/data/skipped_shards"
LOSS_INTERNALS = "train/loss_internals/"  # the DRO loss's own statistics: objective, u, ∂F/∂τ, ...
TAU_SIDE = "train/tau/"  # per-side τ of the step's batch: image_/text_ mean, min, max (CLIP)
TRAIN_TAU = "train_tau/"  # τ of the last trained samples, at evaluation time (CLIP)


def per_s(unit: str) -> str:
    """Throughput of the whole job: `samples` → throughput/samples_per_s (tokens for the LM)."""
    return f"{THROUGHPUT}{unit}_per_s"


def per_s_per_worker(unit: str) -> str:
    return f"{THROUGHPUT}{unit}_per_s_per_worker"


# Names logged before this layout, and what they are called now (for a clear error where a user still
# names one, e.g. checkpoint.keep_best_metric).
RENAMED = {
    "loss": LOSS,
    "samples_per_s": per_s("samples"),
    "tokens_per_s": per_s("tokens"),
    "samples_per_s_per_worker": per_s_per_worker("samples"),
    "tokens_per_s_per_worker": per_s_per_worker("tokens"),
    "data/skipped_samples": SKIPPED_SAMPLES,
    "data/skipped_shards": SKIPPED_SHARDS,
    **{
        f"tau/{side}_{stat}": f"{TAU_SIDE}{side}_{stat}"
        for side in ("image", "text")
        for stat in ("mean", "min", "max")
    },
}
RENAMED_PREFIXES = {"lr/": LR, "loss/": LOSS_INTERNALS}


def renamed(name: str) -> str | None:
    """The current name of a metric logged under `name` before this layout, or None if not renamed."""
    if name in RENAMED:
        return RENAMED[name]
    for old, new in RENAMED_PREFIXES.items():
        if name.startswith(old):
            return new + name.removeprefix(old)
    return None
