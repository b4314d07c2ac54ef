"""Tiny transformers stand-ins built offline for tests: a chat tokenizer + Llama, and a hub-cache layout.

No hub is reachable from CI: `hub_cache_layout` writes what `huggingface_hub` itself would have
downloaded (HF_HOME/hub/models--org--name/{refs/main, snapshots/<commit>/...}), so hub ids resolve
with HF_HUB_OFFLINE=1 through the library's own cache logic.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# A Llama-2-chat-like template (system/user turns are prompt, assistant turns end with EOS).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}<|endoftext|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
COMMIT = "0123456789abcdef0123456789abcdef01234567"

_WORDS = (
    "the quick brown fox jumps over the lazy dog while a small cat sleeps on the warm mat "
    "question answer true false yes no paris london river mountain what is capital of france "
    "system user assistant you are a helpful model please reply briefly thank hello world "
).split()


def training_texts(n: int = 200) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 40))) for _ in range(n)]


def save_tiny_chat_tokenizer(out: Path, vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer directory with the chat template; returns the loaded tokenizer."""
    from transformers import AutoTokenizer

    from dist_tempnet.data.text_tokenizer import BPE_EOS, BPE_PAD, save_hf_tokenizer_dir, train_byte_level_bpe

    out = Path(out)
    save_hf_tokenizer_dir(
        train_byte_level_bpe(training_texts() + [CHAT_TEMPLATE], vocab_size),
        out,
        bos_token=BPE_EOS,
        eos_token=BPE_EOS,
        pad_token=BPE_PAD,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    return tokenizer


def save_tiny_chat_model(out: Path, vocab_size: int = 320, seed: int = 0) -> Path:
    """A tiny Llama (hidden 64, 2 layers) with its chat tokenizer in one save_pretrained directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tokenizer = save_tiny_chat_tokenizer(out, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


def hub_cache_layout(model_dir: Path, hf_home: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """Place `model_dir`'s files as the hub cache holds a downloaded `repo_id` at `commit` (main)."""
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
