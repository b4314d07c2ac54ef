"""`dist-tempnet make-shards`: write webdataset shards (demo CLIP/text data, your image-caption pairs,
or your text files)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_make_shards(args: argparse.Namespace) -> int:
    from dist_tempnet import data

    if args.pairs:
        totals = data.make_pair_shards(
            args.pairs,
            args.out,
            image_column=args.image_column,
            caption_column=args.caption_column,
            image_size=args.image_size,
            resize_mode=args.resize_mode,
            samples_per_shard=args.samples_per_shard,
            quality=args.quality,
            workers=args.workers,
        )
        skipped = totals["failed_to_download"] + totals["failed_to_resize"]
        print(
            f"{totals['successes']} of {totals['count']} pairs written to {args.out} "
            f"({totals['failed_to_download']} images missing, {totals['failed_to_resize']} undecodable; "
            f"{skipped} skipped); indexed in {args.out / 'dataset.json'}"
        )
        return 0
    if args.text:
        if not args.tokenizer:
            raise SystemExit(
                "make-shards --text needs --tokenizer DIR (a local Hugging Face tokenizer directory)"
            )
        out = data.make_token_shards(
            args.text, args.tokenizer, args.out, seq_len=args.seq_len, overwrite=args.overwrite
        )
    elif args.kind == "text":
        out = data.make_demo_text_dataset(
            args.out, seq_len=args.seq_len, seed=args.seed, overwrite=args.overwrite
        )
    else:
        out = data.make_demo_clip_dataset(
            args.out,
            num_train=args.num_train,
            num_eval=args.num_eval,
            image_size=args.image_size or 32,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    print(f"shards written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-shards", help="write webdataset shards (demo CLIP/text data or your text files)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--kind", choices=("clip", "text"), default="clip", help="which demo dataset")
    p.add_argument("--text", nargs="*", default=None, help="text files to tokenize into token shards")
    p.add_argument("--tokenizer", default=None, help="local HF tokenizer dir (with --text)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--num-train", type=int, default=4096)
    p.add_argument("--num-eval", type=int, default=512)
    p.add_argument(
        "--pairs",
        type=Path,
        default=None,
        help="image-caption table (.csv/.tsv/.parquet/.jsonl; image paths relative to it) -> "
        "img2dataset-style shards with _stats.json, indexed",
    )
    p.add_argument("--image-column", default="image", help="image path column (with --pairs)")
    p.add_argument("--caption-column", default="caption", help="caption column (with --pairs)")
    p.add_argument(
        "--resize-mode",
        default="center_crop",
        choices=("center_crop", "keep_ratio", "border", "no"),
        help="how --pairs images are resized to --image-size (img2dataset's modes)",
    )
    p.add_argument("--samples-per-shard", type=int, default=10000, help="with --pairs")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (--pairs)")
    p.add_argument("--workers", type=int, default=1, help="parallel shard writers (--pairs)")
    p.add_argument(
        "--image-size", type=int, default=None, help="demo: 32; --pairs: default keeps the original size"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_make_shards)
