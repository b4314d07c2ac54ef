"""The GPU suite (one GPU, ~8 minutes): LM loss op, the 1.24B LLaMA worker loop, ViT-B/32 CLIP.

Runs the three benchmarks of this folder through their own per-variant subprocess runners and prints
one JSON document and one Markdown table:

1. LM loss at N=16384, V=128256, d=2048, bf16 (fused TempNet loss, chunked CE, plain CE, paper op):
   median time and peak (CUDA max allocated minus what was allocated before) — benchmarks/lm_loss.py;
2. the 1.24B LLaMA worker loop (configs/llama_1b_h100.yaml), plain CE vs TempNet in its three modes,
   ZeRO-2 and ZeRO-3: tokens/s, MFU, peak — benchmarks/train_throughput.py;
3. ViT-B/32 CLIP with iSogCLR+TempNet on 224-px shards made on the box: samples/s reading the shards
   vs compute only (one batch reused) — benchmarks/clip_throughput.py.

Needs torch (CUDA), DeepSpeed, transformers and webdataset (for the CLIP shards); no Ray, no MLflow.
`--tiny` runs the same code at tiny sizes on CPU (CI). Use benchmarks/gpu_suite.sh on a GPU box: it
installs the carried wheels first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import clip_throughput  # noqa: E402
import lm_loss  # noqa: E402
import train_throughput  # noqa: E402

GPU_LOSS_SIZE = "16384x128256x2048"
GPU_LM_VARIANTS = "ce:scratch,tempnet:scratch,tempnet:finetune,tempnet:tempnet_only"
TINY_LM_VARIANTS = "ce:scratch,tempnet:tempnet_only"


def lm_loss_rows(tiny: bool) -> list[dict]:
    size = lm_loss.parse_sizes(lm_loss.TINY_SIZES if tiny else GPU_LOSS_SIZE)[0]
    run_args = argparse.Namespace(
        repeats=2 if tiny else 5,
        chunk_size=lm_loss.TINY_CHUNK_SIZE if tiny else 4096,
        device="cpu" if tiny else "cuda",
        dtype="fp32" if tiny else "bf16",
    )
    rows = []
    for variant in lm_loss.GPU_VARIANTS:
        r = lm_loss.measure(variant, size, run_args)
        rows.append({"variant": variant, "size": "x".join(map(str, size)), **r})
    return rows


def worker_loop_rows(tiny: bool, workdir: Path) -> list[dict]:
    args = argparse.Namespace(
        config=str(REPO / "configs" / ("lm_tiny_scratch.yaml" if tiny else "llama_1b_h100.yaml")),
        task="lm",
        override=list(train_throughput.TINY_LM) if tiny else [],
        steps=3 if tiny else 6,
        warmup=1 if tiny else 2,
        workdir=str(workdir),
    )
    variants = TINY_LM_VARIANTS if tiny else GPU_LM_VARIANTS
    zeros = (2,) if tiny else (2, 3)
    return [train_throughput.measure(v, z, args) for z in zeros for v in variants.split(",")]


def clip_rows(tiny: bool, workdir: Path) -> list[dict]:
    args = argparse.Namespace(
        steps=3 if tiny else 10,
        warmup=1 if tiny else 3,
        overrides=list(clip_throughput.TINY if tiny else clip_throughput.GPU),
        workdir=str(workdir),
    )
    return [clip_throughput.measure("isogclr_tempnet", source, args) for source in ("random", "disk")]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    lines = ["| part | variant | ZeRO | rate | time | peak GiB | MFU | note |", "|---" * 8 + "|"]
    for r in result["lm_loss"]:
        err = r.get("error")
        peak = r.get("peak_bytes")
        lines.append(
            f"| LM loss {r['size']} | {r['variant']} | - | - | "
            f"{_fmt(r.get('median_s'), '.4f')} s | {_fmt(peak / 2**30 if peak else None, '.2f')} | - | "
            f"{err or ''} |"
        )
    for r in result["worker_loop"]:
        lines.append(
            f"| LLaMA loop | {r['variant']} | {r['zero']} | {_fmt(r.get('rate'), ',.0f')} tokens/s | "
            f"{_fmt(r.get('step_s'), '.3f')} s/step | {_fmt(r.get('peak_gib'), '.2f')} | "
            f"{_fmt(r.get('mfu'), '.3f')} | {r.get('error', '')} |"
        )
    for r in result["clip"]:
        err = r.get("error")
        lines.append(
            f"| CLIP | {r['loss']} ({'data' if r['source'] == 'disk' else 'compute only'}) | - | "
            f"{_fmt(r.get('samples_per_s'), ',.0f')} samples/s | "
            f"{_fmt(r.get('step_ms'), '.1f')} ms/step | - | - | "
            f"{'failed' if err else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (CI smoke)")
    p.add_argument("--workdir", default=None, help="where demo data and shards are built (default: temp dir)")
    p.add_argument("--json", default=None, help="also write the JSON document here")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dt-gpu-suite-"))
    (workdir / "clip").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"tiny": args.tiny, "lm_loss": lm_loss_rows(args.tiny)}
    result["worker_loop"] = worker_loop_rows(args.tiny, workdir)
    result["clip"] = clip_rows(args.tiny, workdir / "clip")
    result["wall_s"] = time.perf_counter() - t0
    for part in ("worker_loop", "clip"):
        for r in result[part]:
            r.pop("log", None)
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print("SUITE_JSON " + json.dumps(result, default=str))
    print(markdown(result))
    failed = [r for part in ("lm_loss", "worker_loop", "clip") for r in result[part] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
