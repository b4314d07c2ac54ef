"""Tokenization throughput of `make-shards --text` per corpus format (tokens/s, whole pipeline).

The corpus is the offline stdlib-documentation corpus of the demo (~1.3 MB, ~500 documents),
repeated `--repeat` times, written as .txt files (one per document), one .jsonl, one .parquet and
a `datasets` save_to_disk directory. Each format is tokenized into shards with the demo's byte-level
BPE (vocab 2048), from reading to written shards, with the fast tokenizer's own threads
(`num_proc=1`) and with a 2-process pool.

    python benchmarks/tokenize_throughput.py --repeat 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dist_tempnet.data import make_token_shards, read_manifest
    from dist_tempnet.data.demo_text import stdlib_corpus
    from dist_tempnet.data.text_tokenizer import BPE_EOS, BPE_PAD, save_hf_tokenizer_dir, train_byte_level_bpe

    docs = [text for _, text in stdlib_corpus()] * args.repeat
    tmp = Path(tempfile.mkdtemp(prefix="dt-tok-bench-"))
    tok = save_hf_tokenizer_dir(
        train_byte_level_bpe(docs[:200], 2048), tmp / "tok", eos_token=BPE_EOS, pad_token=BPE_PAD
    )
    (tmp / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp / "txt" / f"{i:05d}.txt").write_text(d)
    (tmp / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": docs}), tmp / "c.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp / "hf"))
    inputs = {
        "txt": [str(tmp / "txt" / "*.txt")],
        "jsonl": [tmp / "c.jsonl"],
        "parquet": [tmp / "c.parquet"],
        "datasets": [tmp / "hf"],
    }
    print(f"{len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB, {os.cpu_count()} CPUs")
    print(f"{'format':10} {'num_proc':>8} {'tokens':>10} {'seconds':>8} {'tokens/s':>10}")
    for num_proc in (1, 2):
        for fmt, paths in inputs.items():
            out = tmp / f"out-{fmt}-{num_proc}"
            t0 = time.perf_counter()
            make_token_shards(
                paths, tok, out, args.seq_len, num_proc=num_proc, heldout_fraction=0.0, samples_per_shard=512
            )
            dt = time.perf_counter() - t0
            n = read_manifest(out / "train").metadata["num_tokens"]
            print(f"{fmt:10} {num_proc:>8} {n:>10,} {dt:>8.2f} {n / dt:>10,.0f}")


if __name__ == "__main__":
    main()
