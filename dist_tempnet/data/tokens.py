"""Token shards for language modelling: text files -> packed fixed-length token sequences.

Documents: a ``.jsonl`` file holds one document per line (its ``"text"`` field); any other file is
one document. Documents are assigned to the train or held-out (``eval``) split as a whole, by a
seeded choice, so no document contributes to both. Within a split, documents are tokenized in
order, each followed by EOS, concatenated, and cut into windows of ``seq_len + 1`` tokens with
stride ``seq_len`` (consecutive windows share one token, so every token after the first is a
next-token target exactly once); the final partial window is dropped.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_tempnet.data.manifest import MANIFEST_NAME
from dist_tempnet.data.shards import ShardSetWriter, progress

TRAIN_SPLIT, HELDOUT_SPLIT = "train", "eval"
MAX_LISTED_DOCUMENTS = 10_000  # larger corpora record only counts in the manifest
_TOKENIZE_BATCH = 32  # documents per tokenizer call (lets the Rust tokenizer use its threads)


@dataclass(frozen=True)
class DocumentRef:
    path: Path
    line: int | None = None  # 1-based line of a .jsonl document

    @property
    def name(self) -> str:
        return str(self.path) if self.line is None else f"{self.path}:{self.line}"


def list_documents(text_files: Sequence[str | Path]) -> list[DocumentRef]:
    """Enumerate documents in a fixed order (files as given, lines in file order)."""
    documents = []
    for file in map(Path, text_files):
        if not file.is_file():
            raise FileNotFoundError(f"text file {file} does not exist")
        if file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as handle:
                documents += [DocumentRef(file, n) for n, line in enumerate(handle, 1) if line.strip()]
        else:
            documents.append(DocumentRef(file))
    return documents


def iter_document_texts(documents: Sequence[DocumentRef]) -> Iterator[str]:
    """Texts of ``documents`` (which must be in list_documents order), reading each file once."""
    by_file: dict[Path, list[DocumentRef]] = {}
    for doc in documents:
        by_file.setdefault(doc.path, []).append(doc)
    for file, docs in by_file.items():
        if docs[0].line is None:
            yield file.read_text(encoding="utf-8")
            continue
        wanted = {d.line for d in docs}
        with open(file, encoding="utf-8") as handle:
            for n, line in enumerate(handle, 1):
                if n in wanted:
                    yield _jsonl_text(line, file, n)


def _jsonl_text(line: str, file: Path, line_number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}:{line_number}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{file}:{line_number}: expected an object with a string 'text' field")
    return record["text"]


def choose_heldout(num_documents: int, heldout_fraction: float, seed: int) -> set[int]:
    """Indices of the held-out documents: round(fraction * n), at least 1 and at most n - 1."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if heldout_fraction == 0.0:
        return set()
    if num_documents < 2:
        raise ValueError(f"a held-out split by document needs >= 2 documents, got {num_documents}")
    count = min(num_documents - 1, max(1, round(heldout_fraction * num_documents)))
    return set(random.Random(f"dist_tempnet/heldout/{seed}").sample(range(num_documents), count))


class SequencePacker:
    """Concatenate token runs and emit windows of ``seq_len + 1`` tokens with stride ``seq_len``."""

    def __init__(self, seq_len: int, dtype: np.dtype) -> None:
        self.seq_len = seq_len
        self.dtype = dtype
        self.pending = np.zeros(0, dtype=dtype)
        self.tokens_in = 0

    def add(self, tokens: Sequence[int]) -> Iterator[np.ndarray]:
        self.tokens_in += len(tokens)
        self.pending = np.concatenate([self.pending, np.asarray(tokens, dtype=self.dtype)])
        window = self.seq_len + 1
        starts = range(0, len(self.pending) - window + 1, self.seq_len)
        for start in starts:
            yield self.pending[start : start + window].copy()
        if len(starts):
            self.pending = self.pending[starts[-1] + self.seq_len :]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def tokenize_documents(tokenizer: Any, texts: Iterable[str], eos_id: int) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS (no BOS: EOS separates documents)."""
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        # verbose=False: long documents are expected here; silence "longer than model_max_length".
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            yield [*ids, eos_id]

    for text in texts:
        batch.append(text)
        if len(batch) == _TOKENIZE_BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def _tokenizer_reference(tokenizer_dir: Path, split_dir: Path) -> str:
    """Relative path when the tokenizer lives inside the dataset (the dataset can move), else absolute."""
    tokenizer_dir = tokenizer_dir.resolve()
    try:
        tokenizer_dir.relative_to(split_dir.parent.resolve())
    except ValueError:
        return str(tokenizer_dir)
    return os.path.relpath(tokenizer_dir, split_dir.resolve())


def _write_split(
    documents: list[DocumentRef],
    tokenizer: Any,
    tokenizer_dir: Path,
    out_dir: Path,
    split: str,
    seq_len: int,
    samples_per_shard: int,
    overwrite: bool,
    extra_metadata: dict[str, Any],
) -> Path:
    vocab_size = len(tokenizer)
    eos_id = tokenizer.eos_token_id
    packer = SequencePacker(seq_len, token_dtype(vocab_size))
    texts = progress(iter_document_texts(documents), len(documents), f"tokenizing {split}")
    with ShardSetWriter(out_dir, split, "tokens", samples_per_shard, overwrite=overwrite) as writer:
        for tokens in tokenize_documents(tokenizer, texts, eos_id):
            for window in packer.add(tokens):
                writer.add({"ids.npy": encode_npy(window)})
        if not writer.shards and writer.next_id == 0:
            raise ValueError(
                f"split {split!r} has {packer.tokens_in} tokens from {len(documents)} documents: not enough "
                f"for one sequence of seq_len + 1 = {seq_len + 1} tokens (lower seq_len or hold out more)"
            )
        names = [d.name for d in documents] if len(documents) <= MAX_LISTED_DOCUMENTS else None
        metadata = {
            "seq_len": seq_len,
            "tokenizer": _tokenizer_reference(tokenizer_dir, out_dir / split),
            "vocab_size": vocab_size,
            "eos_token_id": eos_id,
            "dtype": str(packer.dtype),
            "packing": "documents joined with EOS; windows of seq_len + 1 tokens, stride seq_len",
            "num_documents": len(documents),
            "documents": names,
            "num_tokens": packer.tokens_in,
            "dropped_tail_tokens": int(len(packer.pending)),
            **extra_metadata,
        }
        return writer.finish(metadata)


def make_token_shards(
    text_files: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    seq_len: int,
    *,
    samples_per_shard: int = 256,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Tokenize text files into ``out_dir/train`` and ``out_dir/eval`` token shards; returns out_dir.

    ``tokenizer_dir``: a local HF tokenizer directory (or tokenizer.json) with an EOS token. Sample
    ids are 0..n-1 within each split. ``heldout_fraction=0`` writes only the train split.
    """
    from dist_tempnet.data.text_tokenizer import load_text_tokenizer

    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    tokenizer = load_text_tokenizer(tokenizer_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {tokenizer_dir} has no EOS token (needed between documents)")
    documents = list_documents(text_files)
    if not documents:
        raise ValueError(f"no documents in {list(map(str, text_files))}")
    heldout = choose_heldout(len(documents), heldout_fraction, seed)
    splits = {}
    if heldout:  # written first: the small split is the one likely to be too short for a sequence
        splits[HELDOUT_SPLIT] = [d for i, d in enumerate(documents) if i in heldout]
    splits[TRAIN_SPLIT] = [d for i, d in enumerate(documents) if i not in heldout]
    for split in splits:  # refuse before writing anything
        if (out_dir / split / MANIFEST_NAME).exists() and not overwrite:
            raise FileExistsError(
                f"{out_dir / split} already holds a complete dataset split; pass overwrite=True to replace it"
            )
    extra = {"heldout_fraction": heldout_fraction, "seed": seed}
    for split, docs in splits.items():
        _write_split(
            docs, tokenizer, tokenizer_dir, out_dir, split, seq_len, samples_per_shard, overwrite, extra
        )
    return out_dir
