"""Chat / instruction data -> token shards whose loss mask keeps the assistant's tokens only.

A conversation is a record of any corpus format (data.corpus) holding either a ``messages`` list
(``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``) or a prompt and a response column
(one user turn, one assistant turn). It is rendered with the tokenizer's own chat template
(``apply_chat_template``), so the model sees exactly the format it was tuned on.

Which tokens are the assistant's: for assistant turn i, the template rendered up to turn i with the
generation prompt (``add_generation_prompt=True``) is the prompt; the rendering through turn i adds
the assistant's text (and whatever the template closes the turn with, e.g. ``</s>``). The tokens
whose first character falls in such a span get mask 1, every other token 0 (system prompt, user
turns, role headers). This needs the template to be prefix-stable (each rendering extends the
previous one), which chat templates are; one that is not is refused with the record named.

Conversations are packed like documents (an EOS separator, masked out, between them when the
rendering does not end with EOS) into ``seq_len + 1`` windows; ``mask.npy`` travels with
``ids.npy`` and the LM task turns masked-out targets into ignore_index, so they count neither in
the loss nor in the global valid-token count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dist_tempnet.data.corpus import iter_records, source_format
from dist_tempnet.data.tokens import (
    DocumentRef,
    batched,
    list_documents,
    load_shard_tokenizer,
    write_token_dataset,
)

ROLES = ("system", "user", "assistant")


def chat_columns(path: Path, messages_field: str, prompt_field: str, response_field: str) -> list[str]:
    """The columns this source's conversations come from: the messages column, else prompt + response."""
    fmt = source_format(path)
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "{}")
        try:
            available = list(json.loads(first))
        except (json.JSONDecodeError, TypeError):
            available = []
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        available = pq.ParquetFile(path).schema_arrow.names
    elif fmt == "datasets":
        from dist_tempnet.data.corpus import _load_dataset

        available = _load_dataset(path).column_names
    else:
        raise ValueError(f"{path}: chat data must be .jsonl, .parquet or a datasets directory, not text")
    if messages_field in available:
        return [messages_field]
    if prompt_field in available and response_field in available:
        return [prompt_field, response_field]
    raise ValueError(
        f"{path}: expected a {messages_field!r} column (list of role/content messages) or "
        f"{prompt_field!r} + {response_field!r} columns; found {available}"
    )


def conversation(record: dict[str, Any], columns: Sequence[str], where: str) -> list[dict[str, str]]:
    """The messages of one record, checked (roles, string contents, at least one assistant turn)."""
    if len(columns) == 2:
        prompt, response = (record.get(c) for c in columns)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        messages = record.get(columns[0])
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: {columns[0]!r} must be a non-empty list of messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"{where}: message {k} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.200}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant message (nothing to train on)")
    return out


def render_with_mask(
    tokenizer: Any, messages: list[dict[str, str]], where: str
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask that is 1 on the assistant's tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the tokenizer has no chat template (tokenizer.chat_template is empty)")

    def render(msgs: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], generation_prompt=True) if i else ""
        through = render(messages[: i + 1])
        if not (through.startswith(prompt) and text.startswith(through)):
            raise ValueError(
                f"{where}: the chat template is not prefix-stable at message {i} (rendering the conversation "
                "up to a turn is not a prefix of the full rendering), so assistant tokens cannot be located"
            )
        spans.append((len(prompt), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(enc["input_ids"])
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    eos = tokenizer.eos_token_id
    if not ids or ids[-1] != eos:
        # A packing separator, not part of the model's chat format: never a target (templates end
        # assistant turns with their own stop token, which is inside the assistant span).
        ids.append(eos)
        mask.append(0)
    return ids, mask


_worker_tokenizer: Any = None


def _init_worker(tokenizer: Any) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _render_batch(batch: list[tuple[list[dict[str, str]], str]]) -> list[tuple[list[int], list[int]]]:
    return [render_with_mask(_worker_tokenizer, msgs, where) for msgs, where in batch]


def make_chat_shards(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    out_dir: str | Path,
    seq_len: int,
    *,
    messages_field: str = "messages",
    prompt_field: str = "prompt",
    response_field: str = "response",
    num_proc: int = 1,
    samples_per_shard: int = 256,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Render conversations with ``tokenizer``'s chat template into token shards with ``mask.npy``.

    ``inputs``: .jsonl / .parquet / `datasets` sources (files, directories, globs). Held-out split by
    conversation, as make_token_shards does by document. ``num_proc > 1`` renders in a process pool.
    """
    tok, tok_ref, tok_meta = load_shard_tokenizer(tokenizer)
    documents = list_documents(inputs)
    columns = {
        path: chat_columns(path, messages_field, prompt_field, response_field)
        for path in dict.fromkeys(d.path for d in documents)
    }

    def conversations(docs: Sequence[DocumentRef]) -> Iterator[tuple[list[dict[str, str]], str]]:
        by_file: dict[Path, list[DocumentRef]] = {}
        for doc in docs:
            by_file.setdefault(doc.path, []).append(doc)
        for file, file_docs in by_file.items():
            for row, record in iter_records(file, columns[file], {d.line for d in file_docs}):
                where = DocumentRef(file, row).name
                yield conversation(record, columns[file], where), where

    def encode(docs: Sequence[DocumentRef]) -> Iterator[tuple[list[int], list[int]]]:
        if num_proc <= 1:
            for msgs, where in conversations(docs):
                yield render_with_mask(tok, msgs, where)
            return
        import multiprocessing

        with multiprocessing.Pool(num_proc, _init_worker, (tok,)) as pool:
            for rendered in pool.imap(_render_batch, batched(conversations(docs), 64)):
                yield from rendered

    return write_token_dataset(
        documents, encode, tok, tok_ref, Path(out_dir), seq_len, with_mask=True,
        samples_per_shard=samples_per_shard, heldout_fraction=heldout_fraction, seed=seed,
        overwrite=overwrite,
        extra_metadata={
            "loss_mask": "assistant tokens (chat template: " + type(tok).__name__ + ")",
            "chat_columns": {str(p): c for p, c in columns.items()},
            **tok_meta,
        },
    )  # fmt: skip
