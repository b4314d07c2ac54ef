"""`dist-tempnet make-shards`: write webdataset shards (demo CLIP/text data or your text files)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_make_shards(args: argparse.Namespace) -> int:
    from dist_tempnet import data

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
        try:
            out = data.make_demo_clip_dataset(
                args.out,
                num_train=args.num_train,
                num_eval=args.num_eval,
                image_size=args.image_size,
                seed=args.seed,
                overwrite=args.overwrite,
                class_zipf=args.class_zipf,
                caption_noise=args.caption_noise,
                generic_captions=args.generic_captions,
            )
        except ValueError as exc:  # bad sizes or long-tail shares: the message names the option
            raise SystemExit(f"dist-tempnet make-shards: {exc}") from exc
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
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-zipf", type=float, default=0.0, help="long-tailed demo: class share ∝ rank^-S")
    p.add_argument("--caption-noise", type=float, default=0.0, help="share of wrong-class captions")
    p.add_argument("--generic-captions", type=float, default=0.0, help="share naming only color or shape")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_make_shards)
