"""`dist-tempnet index-shards SOURCE --out INDEX_DIR`: give shards written elsewhere stable sample ids.

SOURCE: a directory of .tar shards (img2dataset output), a brace pattern (`cc12m/{00000..01242}.tar`),
several joined by `::`, or URLs (https://, s3://, gs://, pipe:...). Shards with img2dataset's
`_stats.json` are counted from it; the others are read once, in parallel. Writes INDEX_DIR/dataset.json
atomically; run it again with more shards to append them (existing ids never change). Then train with
`data.path: INDEX_DIR`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def cmd_index_shards(args: argparse.Namespace) -> int:
    from dist_tempnet.data.index import index_shards

    source = args.source if len(args.source) > 1 else args.source[0]
    start = time.perf_counter()
    manifest = index_shards(
        source,
        args.out,
        split=args.split,
        caption_key=args.caption_key,
        workers=args.workers,
        use_stats=not args.ignore_stats,
    )
    seconds = time.perf_counter() - start
    failed = sum(s.failed for s in manifest.shards)
    print(
        f"index {manifest.path}: {len(manifest.shards)} shards, {manifest.num_samples} samples "
        f"(ids [{manifest.id_start}, {manifest.id_stop})), {failed} failed per img2dataset/reading, "
        f"{seconds:.1f}s"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index-shards",
        help="index webdataset shards written elsewhere (img2dataset) so they can be trained on",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", nargs="+", help="shard directory, brace pattern, or URLs")
    p.add_argument("--out", required=True, type=Path, help="index directory (dataset.json is written there)")
    p.add_argument("--split", default="train", help="split name recorded in the index")
    p.add_argument("--caption-key", default="txt", help="caption field of the samples (default: txt)")
    p.add_argument("--workers", type=int, default=None, help="parallel readers (default: CPU count)")
    p.add_argument(
        "--ignore-stats", action="store_true", help="read every shard even where a _stats.json exists"
    )
    p.set_defaults(fn=cmd_index_shards)
