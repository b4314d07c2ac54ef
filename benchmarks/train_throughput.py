"""Throughput of the project's own worker loop (train.Trainer), plain CE vs TempNet, side by side.

Runs without Ray (one process, world size 1), each variant in its own subprocess so peak memory
does not mix. Reports tokens/s (LM) or samples/s (CLIP) from timed optimizer steps after warm-up,
peak memory (CUDA max allocated, or peak RSS on CPU) and, on CUDA, model FLOPs utilization:

    MFU = tokens/s · (6·params + 12·layers·hidden·seq) / peak bf16 FLOP/s   (DESIGN §6)

    python benchmarks/train_throughput.py --config configs/llama_1b_h100.yaml \\
        --variants ce:scratch,tempnet:scratch,tempnet:finetune,tempnet:tempnet_only --zero 2,3
    python benchmarks/train_throughput.py --tiny          # CPU smoke run (CI)

A variant is LOSS:MODE (LM) or a CLIP loss name (clip, isogclr_tempnet, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TINY_LM = [
    "train.steps=8",
    "train.global_batch_size=2",
    "train.micro_batch_size=2",
    "data.seq_len=32",
    "train.warmup_steps=1",
]


def model_flops_per_token(params: int, layers: int, hidden: int, seq: int, backbone_backward: bool) -> float:
    """Model FLOPs per token actually done (DESIGN §6): 6·params + 12·layers·hidden·seq with a
    backward; forward only (2·params + 4·layers·hidden·seq) when the LM is frozen (tempnet_only: no
    backbone backward, TempNet's own FLOPs are negligible), so its MFU is not inflated 3×."""
    if backbone_backward:
        return 6 * params + 12 * layers * hidden * seq
    return 2 * params + 4 * layers * hidden * seq


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def _overrides_for(variant: str, task: str, zero: int) -> list[str]:
    out = [f"deepspeed.zero_stage={zero}", "mlflow.enabled=false", "ray.num_workers=1", "eval.max_batches=1"]
    if task == "lm":
        loss, _, mode = variant.partition(":")
        out += [f"loss.name={loss}", f"train.mode={mode or 'scratch'}"]
    else:
        out += [f"loss.name={variant}"]
    return out


def _save_pretrained_copy(cfg, out_dir: Path) -> str:
    """finetune / tempnet_only start from a pretrained directory: save the preset at init."""
    import torch

    from dist_tempnet.data import load_text_tokenizer, resolve_manifest
    from dist_tempnet.models.lm import build_causal_lm

    manifest = resolve_manifest(cfg.data.path, cfg.data.train_split)
    tokenizer = load_text_tokenizer(cfg.data.tokenizer or manifest.tokenizer_path)
    model = build_causal_lm(cfg.model.preset, vocab_size=len(tokenizer))
    if torch.cuda.is_available():
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)


def run_one(args: argparse.Namespace) -> dict:
    """In this process: build the Trainer for one variant and time its steps."""
    import torch

    from dist_tempnet.config import load_config
    from dist_tempnet.data.prepare import absolutize_paths, prepare_data
    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.trainer import Trainer

    overrides = list(args.override) + _overrides_for(args.one, args.task, args.zero)
    tmp = Path(tempfile.mkdtemp(prefix="dt-bench-"))
    scratch = load_config(args.config, overrides + ["train.mode=scratch"] if args.task == "lm" else overrides)
    absolutize_paths(scratch)
    prepare_data(scratch)
    if (
        args.task == "lm"
        and args.one.partition(":")[2] in ("finetune", "tempnet_only")
        and not scratch.model.pretrained
    ):
        overrides.append(f"model.pretrained={_save_pretrained_copy(scratch, tmp / 'pretrained')}")
    cfg = load_config(args.config, overrides)
    absolutize_paths(cfg)
    trainer = Trainer(cfg, None, LocalSink(tmp / "ckpt", keep_last=1))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, units = [], 0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        metrics = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup and metrics is not None:
            times.append(time.perf_counter() - t0)
            units += metrics["units"]
    per_step = statistics.median(times)
    rate = units / len(times) / per_step
    result = {
        "variant": args.one,
        "zero": args.zero,
        "unit": trainer.task.unit,
        "rate": rate,
        "step_s": per_step,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if cfg.run.task == "lm":
        lm = trainer.task.module.lm
        n_params = sum(p.numel() for p in lm.parameters())
        if cfg.deepspeed.zero_stage == 3:
            n_params = sum(getattr(p, "ds_numel", p.numel()) for p in lm.parameters())
        c = lm.config
        flops_per_token = model_flops_per_token(
            n_params, c.num_hidden_layers, c.hidden_size, cfg.data.seq_len, cfg.train.mode != "tempnet_only"
        )
        peak = peak_flops(result["device"])
        result["params"] = n_params
        result["mfu"] = rate * flops_per_token / peak if peak else None
    return result


def measure(variant: str, zero: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        variant,
        "--zero",
        str(zero),
        "--task",
        args.task,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    if args.config:
        cmd += ["--config", args.config]
    for o in args.override:
        cmd += ["--override", o]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=args.workdir)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        oom = "out of memory" in tail.lower()
        return {
            "variant": variant,
            "zero": zero,
            "error": "OOM" if oom else f"failed (rc={proc.returncode})",
            "log": tail,
        }
    return json.loads(lines[-1][len("RESULT ") :])


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def report(results: list[dict]) -> None:
    print(
        f"\n{'variant':32} {'ZeRO':>4} {'rate':>12} {'step ms':>9} {'peak GiB':>9} {'MFU':>6} {'vs plain':>9}"
    )
    base: dict[int, float] = {}
    for r in results:
        if "error" not in r and (r["variant"].startswith("ce") or r["variant"] == "clip"):
            base[r["zero"]] = r["rate"]
    for r in results:
        if "error" in r:
            print(f"{r['variant']:32} {r['zero']:>4} {r['error']:>12}")
            continue
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") else "-"
        ratio = f"{r['rate'] / base[r['zero']]:.3f}" if r["zero"] in base else "-"
        print(
            f"{r['variant']:32} {r['zero']:>4} {r['rate']:>10,.0f}/s {1000 * r['step_s']:>9.1f} "
            f"{r['peak_gib']:>9.2f} {mfu:>6} {ratio:>9}"
        )
    devices = {r.get("device") for r in results if "device" in r}
    print(f"device: {', '.join(sorted(d for d in devices if d))}; unit: {results[0].get('unit', '?')}/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--task", default=None, help="lm | clip (default: from the config)")
    p.add_argument("--variants", default="ce:scratch,tempnet:scratch,tempnet:finetune,tempnet:tempnet_only")
    p.add_argument("--zero", default="2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--override", action="append", default=[], help="dotted config override (repeatable)")
    p.add_argument("--workdir", default=str(REPO))
    p.add_argument("--tiny", action="store_true", help="tiny LM on CPU in seconds (CI smoke)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.config = args.config or str(REPO / "configs" / "lm_tiny_scratch.yaml")
        args.override = TINY_LM + args.override
        args.steps, args.warmup = 3, 1
    if args.task is None:
        from dist_tempnet.config import load_config

        args.task = load_config(args.config).run.task
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    results = [measure(v, int(z), args) for z in args.zero.split(",") for v in args.variants.split(",")]
    report(results)
    for r in results:
        if "log" in r:
            print(f"--- {r['variant']} ZeRO-{r['zero']} log tail ---\n{r['log']}", file=sys.stderr)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
