"""An offline English corpus and token shards for language-model demos.

The corpus is documentation that ships with Python itself (nothing is downloaded): the help topics
of ``pydoc_data.topics`` (the language reference behind ``help("if")``, ~0.45 MB) and, optionally,
the docstrings of the top-level standard-library modules (read from source with ``ast``, not
imported; ~0.9 MB). Each topic / module is one document. The content depends on the Python version.

Layout written by :func:`make_demo_text_dataset`::

    out_dir/corpus/stdlib_docs.jsonl   {"name": ..., "text": ...} per document
    out_dir/tokenizer/                 byte-level BPE, a transformers tokenizer directory
    out_dir/train/ , out_dir/eval/     token shards + dataset.json (held out by document)
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

from dist_tempnet.data.atomic import write_bytes_atomic
from dist_tempnet.data.manifest import MANIFEST_NAME
from dist_tempnet.data.text_tokenizer import BPE_EOS, BPE_PAD, save_hf_tokenizer_dir, train_byte_level_bpe
from dist_tempnet.data.tokens import HELDOUT_SPLIT, TRAIN_SPLIT, choose_heldout, make_token_shards

CORPUS_FILE = "corpus/stdlib_docs.jsonl"
TOKENIZER_DIR = "tokenizer"
MIN_DOCUMENT_CHARS = 200  # skip near-empty docstring collections


def pydoc_topic_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc_data.topics/{name}", topics[name]) for name in sorted(topics)]


def _docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    nodes = (
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    )
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


def stdlib_docstring_documents() -> list[tuple[str, str]]:
    """One document per top-level stdlib module: its module, class and function docstrings."""
    documents = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            text = "\n\n".join(_docstrings(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # e.g. test fixtures with deliberately broken source
        if len(text) >= MIN_DOCUMENT_CHARS:
            documents.append((f"stdlib/{path.stem}", text))
    return documents


def stdlib_corpus(include_docstrings: bool = True) -> list[tuple[str, str]]:
    documents = pydoc_topic_documents()
    if include_docstrings:
        documents += stdlib_docstring_documents()
    return documents


def write_corpus(documents: list[tuple[str, str]], path: Path) -> Path:
    lines = [json.dumps({"name": name, "text": text}, ensure_ascii=False) for name, text in documents]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def make_demo_text_dataset(
    out_dir: str | Path,
    vocab_size: int = 2048,
    seq_len: int = 128,
    seed: int = 0,
    *,
    samples_per_shard: int = 128,
    heldout_fraction: float = 0.05,
    include_docstrings: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build corpus, BPE tokenizer (trained on the train documents only) and token shards; returns out_dir."""
    out_dir = Path(out_dir)
    for split in (TRAIN_SPLIT, HELDOUT_SPLIT):  # refuse before writing anything
        if (out_dir / split / MANIFEST_NAME).exists() and not overwrite:
            raise FileExistsError(
                f"{out_dir / split} already holds a complete dataset split; pass overwrite=True to replace it"
            )
    documents = stdlib_corpus(include_docstrings)
    corpus = write_corpus(documents, out_dir / CORPUS_FILE)
    # Same seeded choice as make_token_shards makes below, so the tokenizer never sees held-out text.
    heldout = choose_heldout(len(documents), heldout_fraction, seed)
    train_texts = [text for i, (_, text) in enumerate(documents) if i not in heldout]
    tokenizer = train_byte_level_bpe(train_texts, vocab_size)
    tokenizer_dir = save_hf_tokenizer_dir(
        tokenizer, out_dir / TOKENIZER_DIR, bos_token=BPE_EOS, eos_token=BPE_EOS, pad_token=BPE_PAD
    )
    return make_token_shards(
        [corpus],
        tokenizer_dir,
        out_dir,
        seq_len,
        samples_per_shard=samples_per_shard,
        heldout_fraction=heldout_fraction,
        seed=seed,
        overwrite=overwrite,
    )
