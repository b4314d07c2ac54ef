"""Token shards for language modelling: corpora -> packed fixed-length token sequences.

Documents: a row of a ``.jsonl`` file, a Parquet file or a `datasets` directory (its text column,
``"text"`` unless told otherwise), or a whole text file (see data.corpus). Documents are assigned
to the train or held-out (``eval``) split as a whole, by a seeded choice, so no document
contributes to both. With fewer documents than 1 / heldout_fraction (one or a few text files),
whole documents cannot make that share: the last heldout_fraction of each document's tokens is
held out instead (the manifest's ``heldout_by`` says which). Within a split, documents are
tokenized in order, each followed by EOS, concatenated, and cut into windows of ``seq_len + 1``
tokens with stride ``seq_len`` (consecutive windows share one token, so every token after the first
is a next-token target exactly once); the final partial window is dropped. Chat data (data.chat)
is packed the same way with a per-token ``mask.npy`` (1 = the loss counts this token).
"""

from __future__ import annotations

import codecs
import io
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_tempnet.data.corpus import count_rows, expand_sources, iter_records, source_format, text_of
from dist_tempnet.data.manifest import MANIFEST_NAME
from dist_tempnet.data.shards import ShardSetWriter, progress

TRAIN_SPLIT, HELDOUT_SPLIT = "train", "eval"
MAX_LISTED_DOCUMENTS = 10_000  # larger corpora record only counts in the manifest
_TOKENIZE_BATCH = 256  # documents per tokenizer call (the Rust tokenizer spreads a batch over its threads)


@dataclass(frozen=True)
class DocumentRef:
    path: Path
    line: int | None = None  # 1-based line of a .jsonl document; 0-based row of Parquet / datasets

    @property
    def name(self) -> str:
        if self.line is None:
            return str(self.path)
        sep = ":" if source_format(self.path) == "jsonl" else "#"
        return f"{self.path}{sep}{self.line}"


def require_utf8(file: Path, chunk_size: int = 1 << 20) -> None:
    """Raise a ValueError naming the file and byte offset of the first invalid UTF-8 sequence.

    Checked for every file before anything is written, so a bad file never leaves a half-written
    dataset (e.g. the held-out split published and the train split missing)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                position = offset + exc.start - len(decoder.getstate()[0])
                raise ValueError(
                    f"{file}: not valid UTF-8 at byte {max(0, position)} ({exc.reason}); convert it first, "
                    f"e.g. iconv -f latin1 -t utf-8"
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def list_documents(inputs: Sequence[str | Path]) -> list[DocumentRef]:
    """Enumerate documents in a fixed order (sources as given/globbed, rows in source order)."""
    sources = expand_sources(inputs)
    for path in sources:  # every text source is checked before anything is written
        if source_format(path) in ("text", "jsonl"):
            require_utf8(path)
    return [DocumentRef(path, row) for path in sources for row in count_rows(path)]


def iter_document_records(
    documents: Sequence[DocumentRef], columns: Sequence[str]
) -> Iterator[tuple[DocumentRef, dict[str, Any]]]:
    """Records of ``documents`` (which must be in list_documents order), reading each source once."""
    by_file: dict[Path, list[DocumentRef]] = {}
    for doc in documents:
        by_file.setdefault(doc.path, []).append(doc)
    for file, docs in by_file.items():
        cols = ["text"] if source_format(file) == "text" else columns
        for row, record in iter_records(file, cols, {d.line for d in docs}):
            yield DocumentRef(file, row), record


def iter_document_texts(documents: Sequence[DocumentRef], text_field: str = "text") -> Iterator[str]:
    """Texts of ``documents`` (list_documents order); ``text_field``: the column of record formats."""
    for doc, record in iter_document_records(documents, [text_field]):
        field = "text" if doc.line is None else text_field
        yield text_of(record, field, doc.name)


def _check_heldout_fraction(heldout_fraction: float) -> None:
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")


def choose_heldout(num_documents: int, heldout_fraction: float, seed: int) -> set[int]:
    """Indices of the held-out documents: round(fraction * n), at least 1 and at most n - 1."""
    _check_heldout_fraction(heldout_fraction)
    if heldout_fraction == 0.0:
        return set()
    if num_documents < 2:
        raise ValueError(f"a held-out split by document needs >= 2 documents, got {num_documents}")
    count = min(num_documents - 1, max(1, round(heldout_fraction * num_documents)))
    return set(random.Random(f"dist_tempnet/heldout/{seed}").sample(range(num_documents), count))


class SequencePacker:
    """Concatenate token runs and emit windows of ``seq_len + 1`` tokens with stride ``seq_len``.

    With ``with_mask`` every run comes with a 0/1 loss mask of the same length, cut into the same
    windows (chat data: 1 on assistant tokens); ``add`` yields (tokens, mask or None).
    """

    def __init__(self, seq_len: int, dtype: np.dtype, with_mask: bool = False) -> None:
        self.seq_len = seq_len
        self.dtype = dtype
        self.pending = np.zeros(0, dtype=dtype)
        self.pending_mask = np.zeros(0, dtype=np.uint8) if with_mask else None
        self.tokens_in = 0

    def add(
        self, tokens: Sequence[int], mask: Sequence[int] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        if (mask is None) != (self.pending_mask is None) or (mask is not None and len(mask) != len(tokens)):
            raise ValueError("a packer with masks needs one mask value per token (and one without, none)")
        self.tokens_in += len(tokens)
        self.pending = np.concatenate([self.pending, np.asarray(tokens, dtype=self.dtype)])
        if self.pending_mask is not None:
            self.pending_mask = np.concatenate([self.pending_mask, np.asarray(mask, dtype=np.uint8)])
        window = self.seq_len + 1
        starts = range(0, len(self.pending) - window + 1, self.seq_len)
        for start in starts:
            masked = None if self.pending_mask is None else self.pending_mask[start : start + window].copy()
            yield self.pending[start : start + window].copy(), masked
        if len(starts):
            self.pending = self.pending[starts[-1] + self.seq_len :]
            if self.pending_mask is not None:
                self.pending_mask = self.pending_mask[starts[-1] + self.seq_len :]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


_worker_tokenizer: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_batch(batch: list[str], tokenizer: Any = None) -> list[list[int]]:
    # verbose=False: long documents are expected here; silence "longer than model_max_length".
    tok = tokenizer if tokenizer is not None else _worker_tokenizer
    return tok(batch, add_special_tokens=False, verbose=False)["input_ids"]


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_documents(
    tokenizer: Any, texts: Iterable[str], eos_id: int, num_proc: int = 1
) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS (no BOS: EOS separates documents), in order.

    ``num_proc <= 1``: batches go to the fast (Rust) tokenizer, which encodes a batch on all cores
    itself (unless TOKENIZERS_PARALLELISM=false). ``num_proc > 1``: a process pool encodes batches
    (for tokenizers without a parallel batch encoder); ``imap`` keeps document order.
    """
    batches = batched(texts, _TOKENIZE_BATCH)
    if num_proc <= 1:
        for batch in batches:
            for ids in _encode_batch(batch, tokenizer):
                yield [*ids, eos_id]
        return
    import multiprocessing

    with multiprocessing.Pool(num_proc, _init_worker, (tokenizer,)) as pool:
        for encoded in pool.imap(_encode_batch, batches):
            for ids in encoded:
                yield [*ids, eos_id]


def _tokenizer_reference(tokenizer_dir: Path, split_dir: Path) -> str:
    """Relative path when the tokenizer lives inside the dataset (the dataset can move), else absolute."""
    tokenizer_dir = tokenizer_dir.resolve()
    try:
        tokenizer_dir.relative_to(split_dir.parent.resolve())
    except ValueError:
        return str(tokenizer_dir)
    return os.path.relpath(tokenizer_dir, split_dir.resolve())


# Encodes documents (in order) into (token ids, loss mask or None) per document.
Encoder = Callable[[Sequence[DocumentRef]], Iterator[tuple[list[int], list[int] | None]]]


def _write_split(
    documents: list[DocumentRef],
    encode: Encoder,
    with_mask: bool,
    tokenizer: Any,
    tokenizer_ref: str,
    out_dir: Path,
    split: str,
    seq_len: int,
    samples_per_shard: int,
    overwrite: bool,
    extra_metadata: dict[str, Any],
) -> Path:
    vocab_size = len(tokenizer)
    packer = SequencePacker(seq_len, token_dtype(vocab_size), with_mask=with_mask)
    docs = progress(documents, len(documents), f"tokenizing {split}")
    with ShardSetWriter(out_dir, split, "tokens", samples_per_shard, overwrite=overwrite) as writer:
        for tokens, mask in encode(docs):
            for window, window_mask in packer.add(tokens, mask):
                fields = {"ids.npy": encode_npy(window)}
                if window_mask is not None:
                    fields["mask.npy"] = encode_npy(window_mask)
                writer.add(fields)
        if not writer.shards and writer.next_id == 0:
            raise ValueError(
                f"split {split!r} has {packer.tokens_in} tokens from {len(documents)} documents: not enough "
                f"for one sequence of seq_len + 1 = {seq_len + 1} tokens (lower seq_len or hold out more)"
            )
        names = [d.name for d in documents] if len(documents) <= MAX_LISTED_DOCUMENTS else None
        ref = Path(tokenizer_ref)
        metadata = {
            "seq_len": seq_len,
            "tokenizer": _tokenizer_reference(ref, out_dir / split) if ref.exists() else tokenizer_ref,
            "vocab_size": vocab_size,
            "eos_token_id": tokenizer.eos_token_id,
            "dtype": str(packer.dtype),
            "packing": "documents joined with EOS; windows of seq_len + 1 tokens, stride seq_len",
            "num_documents": len(documents),
            "documents": names,
            "num_tokens": packer.tokens_in,
            "dropped_tail_tokens": int(len(packer.pending)),
            **extra_metadata,
        }
        return writer.finish(metadata)


def load_shard_tokenizer(tokenizer: str | Path, revision: str = "") -> tuple[Any, str, dict[str, Any]]:
    """(tokenizer, path the manifest records, metadata) for a local tokenizer or a hub id; EOS required."""
    from dist_tempnet.data.text_tokenizer import load_text_tokenizer
    from dist_tempnet.models.hub import resolve_pretrained

    name = str(tokenizer)
    path = resolve_pretrained(name, revision, "--tokenizer")
    loaded = load_text_tokenizer(path)
    if loaded.eos_token_id is None:
        raise ValueError(f"tokenizer {name} has no EOS token (needed between documents)")
    meta = {} if Path(name).expanduser().exists() else {"tokenizer_id": name, "tokenizer_revision": revision}
    return loaded, str(path), meta


def write_token_dataset(
    documents: list[DocumentRef],
    encode: Encoder,
    tokenizer: Any,
    tokenizer_ref: str,
    out_dir: Path,
    seq_len: int,
    *,
    with_mask: bool,
    samples_per_shard: int,
    heldout_fraction: float,
    seed: int,
    overwrite: bool,
    extra_metadata: dict[str, Any],
) -> Path:
    """Split ``documents`` into train / held-out by document and write both splits' token shards."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not documents:
        raise ValueError("no documents in the given inputs")
    # split -> (documents, encoder); the held-out split first: it is the one likely to be too short.
    splits: dict[str, tuple[list[DocumentRef], Encoder]] = {}
    _check_heldout_fraction(heldout_fraction)
    if heldout_fraction and len(documents) * heldout_fraction < 1:
        heldout_by = "document_tail"
        splits[HELDOUT_SPLIT] = (documents, _tail_of_each(encode, heldout_fraction, tail=True))
        splits[TRAIN_SPLIT] = (documents, _tail_of_each(encode, heldout_fraction, tail=False))
    else:
        heldout_by = "document"
        heldout = choose_heldout(len(documents), heldout_fraction, seed)
        if heldout:
            splits[HELDOUT_SPLIT] = ([d for i, d in enumerate(documents) if i in heldout], encode)
        splits[TRAIN_SPLIT] = ([d for i, d in enumerate(documents) if i not in heldout], encode)
    for split in splits:  # refuse before writing anything
        if (out_dir / split / MANIFEST_NAME).exists() and not overwrite:
            raise FileExistsError(
                f"{out_dir / split} already holds a complete dataset split; pass overwrite=True to replace it"
            )
    extra = {"heldout_fraction": heldout_fraction, "heldout_by": heldout_by, "seed": seed, **extra_metadata}
    for split, (docs, split_encode) in splits.items():
        _write_split(
            docs, split_encode, with_mask, tokenizer, tokenizer_ref, out_dir, split, seq_len,
            samples_per_shard, overwrite, extra,
        )  # fmt: skip
    return out_dir


def _tail_of_each(encode: Encoder, fraction: float, tail: bool) -> Encoder:
    """The last `fraction` of every document's tokens (tail=True), or all but that (tail=False).

    Each split tokenizes the documents itself (twice in all): only few documents take this path."""

    def split(docs: Sequence[DocumentRef]) -> Iterator[tuple[list[int], list[int] | None]]:
        for tokens, mask in encode(docs):
            cut = len(tokens) - max(1, round(fraction * len(tokens)))
            part = slice(cut, None) if tail else slice(0, cut)
            yield tokens[part], None if mask is None else mask[part]

    return split


def make_token_shards(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    out_dir: str | Path,
    seq_len: int,
    *,
    text_field: str = "text",
    num_proc: int = 1,
    samples_per_shard: int = 256,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Tokenize a corpus into ``out_dir/train`` and ``out_dir/eval`` token shards; returns out_dir.

    ``inputs``: files, directories and globs of .txt / .jsonl / .parquet / `datasets` directories
    (see data.corpus); ``text_field`` names the text column of the record formats. ``tokenizer``: a
    local HF tokenizer directory (or tokenizer.json) or a hub id, with an EOS token. ``num_proc``:
    see `tokenize_documents`. Sample ids are 0..n-1 within each split. ``heldout_fraction=0``
    writes only the train split.
    """
    tok, tok_ref, tok_meta = load_shard_tokenizer(tokenizer)
    eos = tok.eos_token_id

    def encode(docs: Sequence[DocumentRef]) -> Iterator[tuple[list[int], None]]:
        for ids in tokenize_documents(tok, iter_document_texts(docs, text_field), eos, num_proc):
            yield ids, None

    return write_token_dataset(
        list_documents(inputs), encode, tok, tok_ref, Path(out_dir), seq_len, with_mask=False,
        samples_per_shard=samples_per_shard, heldout_fraction=heldout_fraction, seed=seed,
        overwrite=overwrite, extra_metadata={"text_field": text_field, **tok_meta},
    )  # fmt: skip
