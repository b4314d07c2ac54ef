"""`dist-tempnet make-shards`: write webdataset shards (demo CLIP/text data, your image-caption pairs,
your text corpus or chat data)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_make_shards(args: argparse.Namespace) -> int:
    """Errors in the inputs are one line naming the file (exit 2), never a traceback."""
    try:
        out = _make(args)
    except FileExistsError as exc:
        message = str(exc).replace("pass overwrite=True", "use --overwrite")
        print(f"dist-tempnet make-shards: {message}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # ManifestError, CorruptShardError, bad text, missing files
        print(f"dist-tempnet make-shards: {exc}", file=sys.stderr)
        return 2
    if out is not None:
        print(f"shards written to {out}")
    return 0


def _make(args: argparse.Namespace) -> Path | None:
    from dist_tempnet import data

    if args.pairs:
        totals = data.make_pair_shards(
            args.pairs,
            args.out,
            image_column=args.image_column,
            caption_column=args.caption_column,
            image_size=args.image_size,
            resize_mode=args.resize_mode,
            samples_per_shard=args.samples_per_shard or 10000,
            quality=args.quality,
            workers=args.workers,
        )
        skipped = totals["failed_to_download"] + totals["failed_to_resize"]
        print(
            f"{totals['successes']} of {totals['count']} pairs written to {args.out} "
            f"({totals['failed_to_download']} images missing, {totals['failed_to_resize']} undecodable; "
            f"{skipped} skipped); indexed in {args.out / 'dataset.json'}"
        )
        return None
    if args.text is not None or args.chat is not None:
        if not (args.text or args.chat):
            raise ValueError("--text/--chat needs at least one input file (or directory / glob)")
        if args.text and args.chat:
            raise ValueError("give --text (plain corpus) or --chat (conversations), not both")
        if not args.tokenizer:
            raise ValueError("--text/--chat needs --tokenizer (a local tokenizer directory or a hub id)")
        common = dict(
            num_proc=args.num_proc,
            samples_per_shard=args.samples_per_shard or 256,
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
            overwrite=args.overwrite,
        )
        if args.text:
            out = data.make_token_shards(
                args.text, args.tokenizer, args.out, args.seq_len, text_field=args.text_field, **common
            )
        else:
            out = data.make_chat_shards(
                args.chat,
                args.tokenizer,
                args.out,
                args.seq_len,
                messages_field=args.messages_field,
                prompt_field=args.prompt_field,
                response_field=args.response_field,
                **common,
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
            class_zipf=args.class_zipf,
            caption_noise=args.caption_noise,
            generic_captions=args.generic_captions,
        )
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-shards",
        help="write webdataset shards (demo CLIP/text data, your image-caption pairs, corpus or chat data)",
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--kind", choices=("clip", "text"), default="clip", help="which demo dataset")
    p.add_argument(
        "--text",
        nargs="+",
        default=None,
        metavar="INPUT",
        help="corpus to tokenize: .txt/.jsonl/.parquet files, datasets save_to_disk dirs, dirs, globs",
    )
    p.add_argument(
        "--chat",
        nargs="+",
        default=None,
        metavar="INPUT",
        help="conversations (.jsonl/.parquet/datasets dirs): rendered with the tokenizer's chat template, "
        "loss on assistant tokens only",
    )
    p.add_argument("--tokenizer", default=None, help="local HF tokenizer dir or hub id (with --text/--chat)")
    p.add_argument("--text-field", default="text", help="text column of .jsonl/.parquet/datasets inputs")
    p.add_argument("--messages-field", default="messages", help="(--chat) column with role/content lists")
    p.add_argument("--prompt-field", default="prompt", help="(--chat) prompt column, when no messages")
    p.add_argument("--response-field", default="response", help="(--chat) response column, when no messages")
    p.add_argument(
        "--num-proc",
        type=int,
        default=1,
        help="1: the fast tokenizer's own multi-threaded batch encoding; N>1: a pool of N processes",
    )
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="documents held out for eval")
    p.add_argument(
        "--samples-per-shard", type=int, default=None, help="default: 256 token blocks, 10000 --pairs samples"
    )
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
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (--pairs)")
    p.add_argument("--workers", type=int, default=1, help="parallel shard writers (--pairs)")
    p.add_argument(
        "--image-size", type=int, default=None, help="demo: 32; --pairs: default keeps the original size"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-zipf", type=float, default=0.0, help="long-tailed demo: class share ∝ rank^-S")
    p.add_argument("--caption-noise", type=float, default=0.0, help="share of wrong-class captions")
    p.add_argument("--generic-captions", type=float, default=0.0, help="share naming only color or shape")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_make_shards)
