"""GPU LM loss benchmark (the issue's targets): plain CE on full logits, chunked CE, the
paper's naive TempNet op and `dt.tempnet_lm_loss` (`fused`: the torch.compile'd chunk kernel, as
training runs it on CUDA; `fused_eager`: the eager reference path), side by side on CUDA, bf16
hidden and head, fp32 logits; each variant in its own process; peak = CUDA max allocated minus what
was allocated before. Checks the targets: fused peak ≤ 1.3× chunked CE, fused time ≤ 1.0× plain CE.

    python benchmarks/gpu_lm_loss.py                 # the three issue sizes on cuda
    python benchmarks/gpu_lm_loss.py --tiny          # CPU smoke (CI): same code path, tiny size
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_loss  # noqa: E402  (the shared per-variant subprocess runner)

GPU_SIZES = "16384x128256x2048,16384x128256x4096,8192x32000x4096"
TARGET_PEAK_VS_CHUNKED = 1.3
TARGET_TIME_VS_PLAIN = 1.0


def check_targets(results: dict[str, dict]) -> list[str]:
    """Human-readable verdicts for one size; empty results or failures are reported as such."""
    needed = ("fused", "chunked_ce", "full_ce")
    if any(k not in results or "error" in results[k] for k in needed):
        return ["targets: not checked (a variant failed)"]
    fused, floor, plain = (results[k] for k in needed)
    peak = fused["peak_bytes"] / max(1, floor["peak_bytes"])
    time = fused["median_s"] / plain["median_s"]
    return [
        f"target peak fused/chunked_ce = {peak:.2f} (≤ {TARGET_PEAK_VS_CHUNKED}): "
        + ("met" if peak <= TARGET_PEAK_VS_CHUNKED else "MISSED"),
        f"target time fused/full_ce = {time:.2f} (≤ {TARGET_TIME_VS_PLAIN}): "
        + ("met" if time <= TARGET_TIME_VS_PLAIN else "MISSED"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    device, dtype = ("cpu", "fp32") if args.tiny else ("cuda", "bf16")
    sizes = lm_loss.parse_sizes(args.sizes or (lm_loss.TINY_SIZES if args.tiny else GPU_SIZES))
    chunk = args.chunk_size or (lm_loss.TINY_CHUNK_SIZE if args.tiny else 4096)
    run_args = argparse.Namespace(
        repeats=args.repeats if not args.tiny else 2, chunk_size=chunk, device=device, dtype=dtype
    )
    failed = False
    for size in sizes:
        results = {v: lm_loss.measure(v, size, run_args) for v in lm_loss.GPU_VARIANTS}
        failed |= any("error" in r for r in results.values())
        lm_loss.report(size, results, run_args)
        print("\n".join(check_targets(results)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
