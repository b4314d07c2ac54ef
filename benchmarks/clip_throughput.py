"""CLIP throughput through the project's own worker loop: data from disk vs compute only.

For each loss (plain InfoNCE and iSogCLR + TempNet) this runs the real Trainer (one process, no
Ray) twice: once reading webdataset shards from disk through the data pipeline, once on a fixed
batch of random tensors already on the device (the compute-only ceiling). It prints samples/s,
the share of step time spent waiting for data, and the ratio disk/compute.

    python benchmarks/clip_throughput.py --gpu          # ViT-B/32, 224 px, batch 512, bf16
    python benchmarks/clip_throughput.py --tiny         # tiny CLIP on CPU in seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU = [
    "model.preset=clip_vit_b32",
    "data.image_size=224",
    "data.max_text_len=32",
    "train.precision=bf16",
    "train.global_batch_size=512",
    "train.micro_batch_size=512",
    "data.num_workers=12",
    "data.demo_num_train=8192",
    "data.demo_num_eval=256",
    "data.shuffle_buffer=2048",
]
TINY = [
    "train.global_batch_size=32",
    "train.micro_batch_size=32",
    "data.demo_num_train=512",
    "data.demo_num_eval=64",
]


class TimedIterator:
    """Wraps the batch stream and adds up the time spent waiting in next()."""

    def __init__(self, inner) -> None:
        self.inner, self.wait_s = inner, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.inner)
        self.wait_s += time.perf_counter() - t0
        return batch


class FixedBatch:
    """The compute-only ceiling: one batch on the device, forever (sample ids cycle for the DRO state)."""

    def __init__(self, batch: dict, num_samples: int) -> None:
        self.batch, self.num_samples, self.calls = batch, num_samples, 0

    def __iter__(self):
        return self

    def __next__(self):
        b = dict(self.batch)
        n = b["sample_ids"].shape[0]
        b["sample_ids"] = (b["sample_ids"] + self.calls * n) % self.num_samples
        self.calls += 1
        return b


def run_one(loss: str, source: str, overrides: list[str], steps: int, warmup: int, workdir: str) -> dict:
    import torch

    from dist_tempnet.config import load_config
    from dist_tempnet.data.prepare import absolutize_paths, prepare_data
    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.trainer import Trainer, to_device

    os.chdir(workdir)
    cfg = load_config(None, overrides + [f"loss.name={loss}", "ray.num_workers=1", "mlflow.enabled=false"])
    absolutize_paths(cfg)
    prepare_data(cfg)
    trainer = Trainer(cfg, None, LocalSink(Path(tempfile.mkdtemp()) / "ckpt", keep_last=1))
    if source == "random":
        first = to_device(next(trainer.batches), trainer.device)
        first["pixel_values"] = torch.randint_like(first["pixel_values"], 0, 256)
        trainer.batches = FixedBatch(first, trainer.task.num_samples)
    timed = TimedIterator(trainer.batches)
    trainer.batches = timed
    cuda = torch.cuda.is_available()
    times, waits = [], []
    for step in range(warmup + steps):
        wait0 = timed.wait_s
        t0 = time.perf_counter()
        metrics = trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup and metrics is not None:
            times.append(time.perf_counter() - t0)
            waits.append(timed.wait_s - wait0)
    step_s = statistics.median(times)
    return {
        "loss": loss,
        "source": source,
        "samples_per_s": cfg.train.global_batch_size / step_s,
        "data_wait_share": sum(waits) / sum(times),
        "step_ms": 1000 * step_s,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def measure(loss: str, source: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        f"{loss}:{source}",
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--workdir",
        args.workdir,
    ] + [x for o in args.overrides for x in ("--override", o)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"loss": loss, "source": source, "error": (proc.stdout + proc.stderr)[-3000:]}
    return json.loads(lines[-1][7:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="ViT-B/32 at 224 px, batch 512, bf16")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--losses", default="clip,isogclr_tempnet")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--override", dest="overrides", action="append", default=[])
    p.add_argument("--workdir", default=None, help="where the demo shards are built (default: a temp dir)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        loss, _, source = args.one.partition(":")
        result = run_one(loss, source, args.overrides, args.steps, args.warmup, args.workdir)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    args.overrides = (GPU if args.gpu else TINY if args.tiny else []) + args.overrides
    if args.tiny:
        args.steps, args.warmup = 3, 1
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="dt-clip-bench-")
    rows = [measure(loss, src, args) for loss in args.losses.split(",") for src in ("random", "disk")]
    print(
        f"\n{'loss':18} {'source':8} {'samples/s':>10} {'step ms':>9} {'data wait':>10} {'disk/compute':>13}"
    )
    compute = {
        r["loss"]: r["samples_per_s"] for r in rows if r.get("source") == "random" and "error" not in r
    }
    for r in rows:
        if "error" in r:
            print(f"{r['loss']:18} {r['source']:8} FAILED\n{r['error']}")
            continue
        ratio = r["samples_per_s"] / compute[r["loss"]] if r["loss"] in compute else float("nan")
        print(
            f"{r['loss']:18} {r['source']:8} {r['samples_per_s']:>10,.0f} {r['step_ms']:>9.1f} "
            f"{r['data_wait_share']:>9.1%} {ratio:>13.3f}"
        )
    print(f"device: {rows[0].get('device', '?')}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
