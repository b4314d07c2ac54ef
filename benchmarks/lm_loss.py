"""Robust LM loss benchmark: fused vs naive TempNet loss, with plain-CE references.

Each (size, variant) runs forward+backward in its own subprocess, so peaks don't mix. One warm-up
run comes first (for `fused_compiled` it includes the torch.compile of the chunk kernel: reported
as "first s"); then the peak is measured over --repeats runs:
  CPU   peak extra RSS = VmHWM after the runs − VmRSS before them (the high-water mark is reset via
        /proc/self/clear_refs), so it counts activations, gradients and workspace; large blocks are
        mmapped (MALLOC_MMAP_THRESHOLD_) so that what the warm-up freed is not counted as resident;
  CUDA  max allocated − allocated before the runs.
Time is the median of the --repeats runs.

Variants: `fused` is `tempnet_lm_loss` as training runs it on that device (the compiled chunk kernel
on CUDA, the eager one on CPU); `fused_eager` and `fused_compiled` force one of the two.

    python benchmarks/lm_loss.py                                  # N=8192, V=32000, d=256, fp32, CPU
    python benchmarks/lm_loss.py --sizes 8192x32000x256,4096x128256x256
    python benchmarks/lm_loss.py --tiny                           # smoke run in seconds (CI)
    python benchmarks/lm_loss.py --device cuda --dtype bf16 --sizes 16384x128256x2048
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("naive", "fused", "fused_eager", "fused_compiled", "chunked_ce", "full_ce")
DEFAULT_VARIANTS = ("naive", "fused_eager", "fused_compiled", "chunked_ce", "full_ce")
TINY_VARIANTS = ("naive", "fused", "chunked_ce", "full_ce")  # no compile in the smoke run
# On CUDA `fused` is the compiled kernel; the eager path is kept for the side-by-side ratio.
GPU_VARIANTS = ("naive", "fused", "fused_eager", "chunked_ce", "full_ce")
DESCRIPTIONS = {
    "naive": "TempNet loss on full N×V logits (paper-style)",
    "fused": "tempnet_lm_loss, this device's default chunk kernel",
    "fused_eager": "tempnet_lm_loss, eager chunk path",
    "fused_compiled": "tempnet_lm_loss, torch.compile'd chunk kernel",
    "chunked_ce": "chunked_cross_entropy, no TempNet (floor)",
    "full_ce": "F.cross_entropy on full logits (transformers)",
}
COMPILED = {"fused": None, "fused_eager": False, "fused_compiled": True}
MMAP_THRESHOLD = str(1 << 20)  # bytes; fixing it turns off glibc's adaptive threshold
RHO = 8.0
TINY_SIZES = "256x1000x32"
TINY_CHUNK_SIZE = 64


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"size {item!r}: expected NxVxd, e.g. 8192x32000x256")
        sizes.append(tuple(int(p) for p in parts))
    return sizes


# ---------------------------------------------------------------------------------------------
# worker: one variant, one size, in this process


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1))


class _PeakMemory:
    """Peak extra memory since `start()`: RSS high-water mark on CPU, allocator peak on CUDA."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _status_kib("VmRSS") * 1024

    def peak_extra_bytes(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def _make_step(variant: str, n: int, vocab: int, d: int, dtype, device, chunk_size: int):
    """Inputs and a zero-arg forward+backward closure for one variant."""
    import torch
    import torch.nn.functional as F

    from dist_tempnet.losses.lm import chunked_cross_entropy, naive_tempnet_lm_loss, tempnet_lm_loss
    from dist_tempnet.tempnet import LMTempNet

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    labels[::10] = -100
    tempnet = LMTempNet(vocab).to(device).eval()  # eval: deterministic τ, same work as train mode
    params = [hidden, weight, *tempnet.parameters()]

    def loss() -> torch.Tensor:
        if variant == "naive":
            return naive_tempnet_lm_loss(hidden, weight, labels, tempnet, RHO).loss
        if variant in COMPILED:
            compiled = COMPILED[variant]
            return tempnet_lm_loss(
                hidden, weight, labels, tempnet, RHO, chunk_size=chunk_size, compiled=compiled
            ).loss
        if variant == "chunked_ce":
            return chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
        return F.cross_entropy((hidden @ weight.t()).float(), labels)

    def clear() -> None:
        for p in params:
            p.grad = None

    def step() -> None:
        clear()
        loss().backward()

    return step, clear


def run_worker(args: argparse.Namespace) -> None:
    import torch

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    n, vocab, d = parse_sizes(args.worker_size)[0]
    step, clear = _make_step(args.worker, n, vocab, d, dtype, device, args.chunk_size)

    def timed() -> float:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = timed()  # warm-up (and the compile, for the compiled kernel): not in the peak or median
    clear()
    gc.collect()
    memory = _PeakMemory(device)
    memory.start()
    times = [timed() for _ in range(args.repeats)]
    env = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(json.dumps({"peak_bytes": memory.peak_extra_bytes(), "times": times, "first_s": first, "env": env}))


def run_interleaved(size: tuple[int, int, int], variants: list[str], args: argparse.Namespace) -> None:
    """Time ratios on a busy machine: every variant in this one process, one step of each in turn
    (rotating the order), so load from other jobs hits all variants alike. No peaks in this mode."""
    import torch

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    steps = {v: _make_step(v, *size, dtype, device, args.chunk_size) for v in variants}

    def timed(variant: str) -> float:
        step, clear = steps[variant]
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        clear()
        return elapsed

    first = {v: timed(v) for v in variants}  # warm-up, compile included
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            times[v].append(timed(v))
    median = {v: statistics.median(t) for v, t in times.items()}
    n, vocab, d = size
    print(f"\nN={n} V={vocab} d={d} {args.dtype} {args.device} chunk_size={args.chunk_size}, interleaved "
          f"(median of {args.repeats} rounds after 1 warm-up; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")  # fmt: skip
    print(f"{'variant':<15} {'median s':>10} {'first s':>9}  runs")
    for v in variants:
        runs = " ".join(f"{t:.2f}" for t in times[v])
        print(f"{v:<15} {median[v]:>10.3f} {first[v]:>9.2f}  {runs}")
    for fused in (v for v in COMPILED if v in median):
        print(
            "; ".join(
                f"{fused}/{ref}: time {median[fused] / median[ref]:.3f}" for ref in median if ref != fused
            )
        )


def run_chunk_pass(size: tuple[int, int, int], args: argparse.Namespace) -> None:
    """The per-chunk pointwise work alone, on one chunk_size×V block of fp32 logits (no matmuls): the
    eager reference (`_eager_chunk`) against the compiled kernel, interleaved, both producing the
    loss sums, ∂ℓ/∂τ and ∂ℓ/∂z. Each run first restores the logits (both paths overwrite them); that
    copy is timed alone and subtracted."""
    import math

    import torch

    from dist_tempnet.losses import lm

    device = torch.device(args.device)
    n, vocab, _ = size
    rows = min(args.chunk_size, n)
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(device)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)
    valid = (torch.arange(rows) % 10 != 0).to(device)
    tau = (0.05 + torch.rand(rows, generator=gen)).to(device)
    scale = valid.float() / valid.sum()
    rho_term = RHO - math.log(vocab)
    work, probs = torch.empty_like(logits), torch.empty_like(logits)
    kernel = lm._compiled_chunk_kernel()
    paths = {
        "copy": lambda: work.copy_(logits),
        "eager": lambda: lm._eager_chunk(
            work.copy_(logits), probs, targets, valid, tau, scale, rho_term, True, True
        ),
        "compiled": lambda: kernel(work.copy_(logits), targets, valid, tau, scale, rho_term, None, True),
    }

    def timed(path: str) -> float:
        start = time.perf_counter()
        paths[path]()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = {p: timed(p) for p in paths}
    eager_grad = (paths["eager"]()[3]).clone()
    paths["compiled"]()
    torch.testing.assert_close(work, eager_grad)  # same ∂z from both paths
    times: dict[str, list[float]] = {p: [] for p in paths}
    names = list(paths)
    for r in range(args.repeats):
        for p in names[r % 3 :] + names[: r % 3]:
            times[p].append(timed(p))
    median = {p: statistics.median(t) for p, t in times.items()}
    eager, compiled = (median[p] - median["copy"] for p in ("eager", "compiled"))
    print(
        f"\nchunk pass {rows}x{vocab} fp32 {args.device}, interleaved median of {args.repeats} "
        f"({torch.get_num_threads()} threads): eager {eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms "
        f"(restoring copy {median['copy'] * 1e3:.1f} ms subtracted; compile {first['compiled']:.1f} s); "
        f"compiled/eager: time {compiled / eager:.3f}"
    )


# ---------------------------------------------------------------------------------------------
# driver


def measure(variant: str, size: tuple[int, int, int], args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", variant, "--worker-size", "x".join(map(str, size)),
        "--repeats", str(args.repeats), "--chunk-size", str(args.chunk_size),
        "--device", args.device, "--dtype", args.dtype,
    ]  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["median_s"] = statistics.median(result["times"])
    return result


def _ratio(a: dict, b: dict, key: str) -> str:
    if "error" in a or "error" in b or not b[key]:
        return "n/a"
    return f"{a[key] / b[key]:.3f}"


def report(size: tuple[int, int, int], results: dict[str, dict], args: argparse.Namespace) -> None:
    n, vocab, d = size
    env = next((res["env"] for res in results.values() if "env" in res), "")
    print(
        f"\nN={n} V={vocab} d={d} {args.dtype} {args.device} chunk_size={args.chunk_size} "
        f"(median of {args.repeats} after 1 warm-up; {env})"
    )
    print(f"{'variant':<15} {'peak extra MiB':>15} {'median s':>10} {'first s':>9}  what")
    for variant, res in results.items():
        if "error" in res:
            print(f"{variant:<15} {'failed':>15} {'':>10} {'':>9}  {res['error']}")
            continue
        print(
            f"{variant:<15} {res['peak_bytes'] / 2**20:>15.1f} {res['median_s']:>10.3f} "
            f"{res['first_s']:>9.2f}  {DESCRIPTIONS[variant]}"
        )
    for fused in (v for v in COMPILED if v in results):
        ratios = [
            f"{fused}/{ref}: memory {_ratio(results[fused], results[ref], 'peak_bytes')}, "
            f"time {_ratio(results[fused], results[ref], 'median_s')}"
            for ref in ("naive", "chunked_ce", "full_ce", "fused_eager")
            if ref in results and ref != fused
        ]
        print("; ".join(ratios))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=parse_sizes, default=None, help="comma list of NxVxd")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma list from {VARIANTS}; default {','.join(DEFAULT_VARIANTS)} "
        f"({','.join(TINY_VARIANTS)} with --tiny)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (64 if --tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--tiny", action="store_true", help=f"smoke run at {TINY_SIZES}")
    parser.add_argument(
        "--interleave", action="store_true", help="time all variants in one process, alternating (no peaks)"
    )
    parser.add_argument(
        "--chunk-pass", action="store_true", help="time one chunk's pointwise pass: eager vs compiled kernel"
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))  # run from a checkout without installing the package
    if args.chunk_size is None and args.tiny:
        args.chunk_size = TINY_CHUNK_SIZE  # several chunks, so the smoke run exercises the loop
    if args.chunk_size is None:
        from dist_tempnet.losses.lm import DEFAULT_CHUNK_SIZE

        args.chunk_size = DEFAULT_CHUNK_SIZE
    if args.worker:
        run_worker(args)
        return 0

    sizes = args.sizes or parse_sizes(TINY_SIZES if args.tiny else "8192x32000x256")
    variants = (
        [v.strip() for v in args.variants.split(",")]
        if args.variants
        else list(TINY_VARIANTS if args.tiny else DEFAULT_VARIANTS)
    )
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if args.chunk_pass:
        for size in sizes:
            run_chunk_pass(size, args)
        return 0
    if args.interleave:
        for size in sizes:
            run_interleaved(size, variants, args)
        return 0
    failed = False
    for size in sizes:
        results = {variant: measure(variant, size, args) for variant in variants}
        failed |= any("error" in res for res in results.values())
        report(size, results, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
