"""img2dataset-style shards: indexing rate, and tiny-CLIP training from URLs vs local files.

Writes N samples as img2dataset lays them out (NNNNNNNNN.tar with .jpg/.txt/.json, _stats.json
beside), then
1. times `index_shards` reading every tar (``--ignore-stats`` path) with 2 worker processes, and with
   the _stats.json files (no tar read);
2. serves the directory with http.server on 127.0.0.1 and runs the real Trainer (one process, no
   Ray, iSogCLR + TempNet, tiny CLIP) on the index of the local files and on the index of the same
   shards by http:// URL (read through webdataset's gopen / curl), side by side.

    python benchmarks/clip_url_shards.py                 # ~4k samples, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

WORDS = "red green blue small large photo of a the square circle picture".split()


def write_shards(out: Path, num_shards: int, per_shard: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for s in range(num_shards):
        with wds.TarWriter(str(out / f"{s:09d}.tar"), encoder=False) as tar:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(buf, "JPEG")
                key = f"{s:05d}{i:04d}"
                caption = " ".join(rng.choice(WORDS, 6))
                meta = json.dumps({"key": key, "caption": caption}).encode()
                tar.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption.encode(), "json": meta})
        stats = {"count": per_shard, "successes": per_shard, "failed_to_download": 0}
        (out / f"{s:09d}_stats.json").write_text(json.dumps(stats))


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def train_rate(index_dir: Path, tokenizer: Path, steps: int, warmup: int, workers: int) -> float:
    from dist_tempnet.config import load_config
    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.trainer import Trainer

    overrides = [
        f"data.path={index_dir}", "data.demo=false", f"data.tokenizer={tokenizer}", "data.image_size=32",
        f"data.num_workers={workers}", "loss.name=isogclr_tempnet", "ray.num_workers=1",
        "train.global_batch_size=64", "train.micro_batch_size=64", "mlflow.enabled=false",
        f"train.steps={steps + warmup}",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, None, LocalSink(Path(tempfile.mkdtemp()) / "ckpt", keep_last=1))
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        trainer.train_step()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    trainer.batches.close()
    return cfg.train.global_batch_size / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers in training")
    p.add_argument("--rounds", type=int, default=2, help="alternating local/URL training runs")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dist_tempnet.data.index import index_shards
    from dist_tempnet.data.text_tokenizer import build_word_level_tokenizer

    work = Path(tempfile.mkdtemp(prefix="dt-url-bench-"))
    shards = work / "shards"
    shards.mkdir()
    write_shards(shards, args.shards, args.per_shard, args.image_size)
    n = args.shards * args.per_shard
    tokenizer = work / "tokenizer.json"
    tokenizer.write_text(build_word_level_tokenizer([" ".join(WORDS)]).to_str())

    t0 = time.perf_counter()
    index_shards(shards, work / "index_read", workers=2, use_stats=False)
    read_rate = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    index_shards(shards, work / "index_stats", workers=2)
    stats_rate = n / (time.perf_counter() - t0)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{{{0:09d}..{args.shards - 1:09d}}}.tar"
    index_shards(url, work / "index_url", workers=2)
    # Alternate local / URL runs: on a shared machine the load drifts, alternation spreads it evenly.
    rates: dict[str, list[float]] = {"local": [], "url": []}
    for _ in range(args.rounds):
        for name, index in (("local", work / "index_stats"), ("url", work / "index_url")):
            rates[name].append(train_rate(index, tokenizer, args.steps, args.warmup, args.num_workers))
    local, remote = statistics.median(rates["local"]), statistics.median(rates["url"])
    server.shutdown()
    print(f"samples: {n} in {args.shards} shards, {args.image_size}px JPEG")
    print(f"index-shards reading every tar (2 processes): {read_rate:,.0f} samples/s")
    print(f"index-shards from _stats.json:                {stats_rate:,.0f} samples/s")
    print(f"training (tiny CLIP, iSogCLR+TempNet, batch 64, {args.num_workers} loader workers):")
    print(f"  local files  {local:8.1f} samples/s  (runs: {', '.join(f'{r:.1f}' for r in rates['local'])})")
    print(f"  http:// URLs {remote:8.1f} samples/s  (runs: {', '.join(f'{r:.1f}' for r in rates['url'])})")
    print(f"  URL / local = {remote / local:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
