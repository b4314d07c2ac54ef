"""Why does TempNet's τ (not) move? Gradient norms and readout attention entropy, per step.

Runs the project's own worker loop in this process (one rank, no Ray, no MLflow) on a CLIP config
and records, for every optimizer step:

- the L2 norm of the gradient reaching each TempNet parameter (image and text TempNet: `proj`,
  `prototypes`, the readout's temperature `log_scale`, its last layer `out.weight` / `out.bias`);
- the readout's attention entropy H(softmax(p / e^s)) divided by log M (1.0 = uniform attention),
  and the spread of the readout's pre-sigmoid score over the batch;
- τ's p10 / p50 / p90 over the batch.

    python benchmarks/tempnet_diagnose.py --config configs/clip_tiny_tempnet.yaml --steps 300
    python benchmarks/tempnet_diagnose.py --override loss.tempnet_lr=1e-2 ...

It prints one line every `--every` steps and a summary (medians over the run) at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Probe:
    """Hooks on both TempNets: gradient norms per parameter, attention entropy, score spread."""

    def __init__(self, loss_fn) -> None:
        import torch

        self.torch = torch
        self.grad_sq: dict[str, float] = defaultdict(float)
        self.entropy: list[float] = []
        self.score_std: list[float] = []
        self.handles = []
        for side in ("image", "text"):
            tempnet = getattr(loss_fn, f"{side}_tempnet")
            for name, param in tempnet.named_parameters():
                key = f"{side}.{name}"
                self.handles.append(param.register_hook(self._grad_hook(key)))
            self.handles.append(tempnet.readout.register_forward_hook(self._readout_hook))

    def _grad_hook(self, key: str):
        def hook(grad):
            self.grad_sq[key] += float(grad.detach().double().pow(2).sum())

        return hook

    def _readout_hook(self, module, inputs, output) -> None:
        torch = self.torch
        scores, values = inputs
        with torch.no_grad():
            attn = torch.softmax(scores / module.log_scale.exp(), dim=-1)
            entropy = -(attn * attn.clamp_min(1e-30).log()).sum(-1) / math.log(module.width)
            score = module.out((attn - 1.0 / module.width) * values).squeeze(-1)
        self.entropy.append(float(entropy.mean()))
        self.score_std.append(float(score.std()))

    def take(self) -> dict[str, float]:
        out = {f"grad/{k}": math.sqrt(v) for k, v in sorted(self.grad_sq.items())}
        out["attn_entropy"] = statistics.fmean(self.entropy) if self.entropy else float("nan")
        out["score_std"] = statistics.fmean(self.score_std) if self.score_std else float("nan")
        self.grad_sq.clear()
        self.entropy.clear()
        self.score_std.clear()
        return out


def run(config: str, overrides: list[str], steps: int, every: int, workdir: str) -> list[dict]:
    import torch

    from dist_tempnet import metric_names as names
    from dist_tempnet.config import load_config
    from dist_tempnet.data.prepare import absolutize_paths, prepare_data
    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.trainer import Trainer

    os.chdir(workdir)
    cfg = load_config(
        config, [*overrides, f"train.steps={steps}", "ray.num_workers=1", "mlflow.enabled=false"]
    )
    absolutize_paths(cfg)
    prepare_data(cfg)
    trainer = Trainer(cfg, None, LocalSink(Path(tempfile.mkdtemp()) / "ckpt", keep_last=1))
    probe = Probe(trainer.task.loss_fn)
    rows = []
    taus: list[torch.Tensor] = []
    # Keep every micro batch's τ (both sides) for the percentiles.
    trainer.task.loss_fn.register_forward_hook(
        lambda module, inputs, out: taus.append(torch.cat([out.image_tau, out.text_tau]))
    )
    for step in range(1, steps + 1):
        trainer.task.before_step(step - 1)
        # The loop's metrics are device tensors (synced at log_every): take plain floats here.
        metrics = {k: float(v) for k, v in (trainer.train_step() or {}).items()}
        trainer.step = step
        row = {"step": step, **probe.take()}
        tau = torch.cat([t.flatten() for t in taus]).double()
        taus.clear()
        q = torch.quantile(tau, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        row.update(
            {"tau_p10": q[0], "tau_p50": q[1], "tau_p90": q[2], "loss": metrics.get(names.LOSS, math.nan)}
        )
        # ∂F/∂τ over the batch (the loss's own statistics): > 0 everywhere pushes every τ down.
        for k in ("min", "mean", "max"):
            row[f"dF_dtau_{k}"] = metrics.get(f"{names.LOSS_INTERNALS}grad_tau_image_{k}", math.nan)
        rows.append(row)
        if step % every == 0 or step == 1:
            grads = {k.removeprefix("grad/"): v for k, v in row.items() if k.startswith("grad/image.")}
            shown = " ".join(f"{k.removeprefix('image.')}={v:.2e}" for k, v in grads.items())
            print(
                f"step {step:4d} loss {row['loss']:.4f} τ p10/p50/p90 {q[0]:.5f}/{q[1]:.5f}/{q[2]:.5f} "
                f"H/logM {row['attn_entropy']:.4f} score std {row['score_std']:.2e} | dF/dτ min/mean/max "
                f"{row['dF_dtau_min']:.2f}/{row['dF_dtau_mean']:.2f}/{row['dF_dtau_max']:.2f} | "
                f"image grads {shown}",
                flush=True,
            )
    evaluation = trainer.task.evaluate(trainer.engine)
    print("evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in evaluation.items()), flush=True)
    return rows


def summarize(rows: list[dict], warmup: int) -> dict[str, float]:
    late = rows[warmup:] or rows
    keys = [k for k in late[0] if k.startswith(("grad/", "dF_dtau")) or k in ("attn_entropy", "score_std")]
    out = {f"median {k}": statistics.median(r[k] for r in late) for k in keys}
    last = rows[-1]
    out |= {f"final {k}": last[k] for k in ("tau_p10", "tau_p50", "tau_p90", "attn_entropy")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "clip_tiny_tempnet.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--override", dest="overrides", action="append", default=[])
    p.add_argument("--workdir", default=None, help="where the demo shards are built (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the per-step rows here")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="dt-tempnet-diag-")
    config = str(Path(args.config).resolve())
    rows = run(config, args.overrides, args.steps, args.every, workdir)
    summary = summarize(rows, warmup=20)
    print("\nsummary (medians after step 20):")
    for k, v in summary.items():
        print(f"  {k:40s} {v:.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
