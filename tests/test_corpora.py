"""Corpora in common formats -> token shards; chat data -> shards with an assistant-only loss mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_tempnet.data import eval_batches, make_chat_shards, make_token_shards, read_manifest
from dist_tempnet.tasks.lm import inputs_and_labels
from tests._tiny_hf import save_tiny_chat_tokenizer, training_texts


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "chat-tok"
    save_tiny_chat_tokenizer(out)
    return out


def _stream(out: Path) -> list[int]:
    """The packed token stream of a train split (windows overlap by one token)."""
    windows = torch.cat([b["input_ids"] for b in eval_batches(out, "train", batch_size=64)])
    return torch.cat([windows[0], windows[1:, 1:].reshape(-1)]).tolist()


def test_corpus_formats_globs_and_pool_give_the_same_packed_stream(tmp_path, tok_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dist_tempnet.data.text_tokenizer import load_text_tokenizer

    docs = training_texts(40)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):  # one document per file; names sort in document order
        (tmp_path / "txt" / f"doc{i:03d}.txt").write_text(d)
    (tmp_path / "jsonl").mkdir()
    for part in range(2):  # many files, matched by a glob
        rows = docs[part * 20 : (part + 1) * 20]
        (tmp_path / "jsonl" / f"part{part}.jsonl").write_text(
            "".join(json.dumps({"id": k, "body": d}) + "\n" for k, d in enumerate(rows))
        )
    pq.write_table(pa.table({"body": docs[:25]}), tmp_path / "a.parquet", row_group_size=7)
    pq.write_table(pa.table({"body": docs[25:]}), tmp_path / "b.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs})}).save_to_disk(tmp_path / "hf")

    common = dict(seq_len=16, samples_per_shard=8, heldout_fraction=0.0)
    inputs = {
        "txt": [str(tmp_path / "txt" / "*.txt")],
        "jsonl": [str(tmp_path / "jsonl" / "part*.jsonl")],
        "parquet": [tmp_path / "a.parquet", tmp_path / "b.parquet"],
        "datasets": [tmp_path / "hf"],
    }
    streams = {}
    for fmt, paths in inputs.items():
        field = "text" if fmt == "txt" else "body"
        out = make_token_shards(paths, tok_dir, tmp_path / f"out-{fmt}", text_field=field, **common)
        streams[fmt] = _stream(out)
        assert read_manifest(out / "train").metadata["num_documents"] == len(docs)
    pooled = make_token_shards(
        inputs["parquet"], tok_dir, tmp_path / "out-pool", text_field="body", num_proc=2, **common
    )
    streams["pool"] = _stream(pooled)
    assert all(s == streams["txt"] for s in streams.values()), {k: len(s) for k, s in streams.items()}
    # Documents in order, each followed by EOS; only the tail that fills no window is dropped.
    tokenizer = load_text_tokenizer(tok_dir)
    expected = tokenizer.eos_token.join(docs) + tokenizer.eos_token
    decoded = tokenizer.decode(streams["txt"])
    assert expected.startswith(decoded) and len(decoded) > len(expected) - 100

    with pytest.raises(ValueError, match=r"a\.parquet: no column 'text' \(columns: body\)"):
        make_token_shards([tmp_path / "a.parquet"], tok_dir, tmp_path / "bad", **common)
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        make_token_shards([str(tmp_path / "*.nothing")], tok_dir, tmp_path / "bad", **common)


def _conversations() -> list[dict]:
    rows = []
    for i in range(12):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "you are a helpful model"},
                    {"role": "user", "content": f"what is the capital of france {i}"},
                    {"role": "assistant", "content": f"paris {i}"},
                    {"role": "user", "content": "thank you"},
                    {"role": "assistant", "content": "yes"},
                ]
            }
        )
    return rows


def test_chat_shards_mask_only_assistant_tokens(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dist_tempnet.data.text_tokenizer import load_text_tokenizer

    convs = _conversations()
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    out = make_chat_shards([tmp_path / "chat.jsonl"], tok_dir, tmp_path / "shards", 24, heldout_fraction=0)
    meta = read_manifest(out / "train").metadata
    assert meta["loss_mask"].startswith("assistant tokens")
    batches = list(eval_batches(out, "train", batch_size=64))
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["loss_mask"] for b in batches])
    tokenizer = load_text_tokenizer(tok_dir)
    stream = torch.cat([ids[0], ids[1:, 1:].reshape(-1)])
    stream_mask = torch.cat([mask[0], mask[1:, 1:].reshape(-1)])
    eos = tokenizer.eos_token
    # Masked-in tokens are exactly the assistant replies and what the template closes them with.
    answers = "".join(f"paris {i}{eos}\nyes{eos}\n" for i in range(12))
    learned = tokenizer.decode(stream[stream_mask])
    assert answers.startswith(learned) and len(learned) > len(answers) // 2, learned
    prompt_text = tokenizer.decode(stream[~stream_mask])
    assert "capital of france" in prompt_text and "<|assistant|>" in prompt_text
    assert "paris" not in prompt_text

    # The LM task's targets: masked-out positions are ignore_index, so they count nowhere.
    inputs, labels = inputs_and_labels({"input_ids": ids, "loss_mask": mask})
    assert torch.equal(labels != -100, mask[:, 1:]) and torch.equal(inputs, ids[:, :-1])

    # prompt/response columns (Parquet) render as one user and one assistant turn.
    table = pa.table({"prompt": [f"say yes {i}" for i in range(8)], "response": ["yes"] * 8})
    pq.write_table(table, tmp_path / "pr.parquet")
    out2 = make_chat_shards([tmp_path / "pr.parquet"], tok_dir, tmp_path / "pr", 16, heldout_fraction=0)
    b = next(iter(eval_batches(out2, "train", batch_size=64)))
    assert set(tokenizer.decode(b["input_ids"][b["loss_mask"]]).split(eos)) <= {"yes", "\n", "\nyes", ""}

    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no assistant message"):
        make_chat_shards([tmp_path / "bad.jsonl"], tok_dir, tmp_path / "bad", 16, heldout_fraction=0)
