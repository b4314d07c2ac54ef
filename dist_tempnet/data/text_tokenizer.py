"""Tokenizers for the demo datasets (built offline with HF ``tokenizers``) and loading any local one.

``transformers`` is imported lazily: it is slow to import and only needed when a tokenizer is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Word-level caption tokenizer. Ids are fixed by position: [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3.
# EOS is deliberately not id 2: HF CLIP text models treat eos_token_id == 2 as "legacy" and pool
# at argmax(input_ids) instead of at the EOS token.
WORD_SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

# Byte-level BPE for the text corpus (GPT-2 convention: one token both starts and ends documents).
BPE_EOS = "<|endoftext|>"
BPE_PAD = "<|pad|>"

_SPECIAL_CANDIDATES = {
    "pad_token": ("[PAD]", "<pad>", "<|pad|>"),
    "unk_token": ("[UNK]", "<unk>", "<|unk|>"),
    "bos_token": ("[BOS]", "<s>", "<bos>", "<|endoftext|>"),
    "eos_token": ("[EOS]", "</s>", "<eos>", "<|endoftext|>"),
}


def _caption_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _caption_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def build_word_level_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """A lowercase word-level tokenizer whose vocabulary is every word/punctuation mark in ``texts``.

    The vocabulary is sorted (not frequency-ordered) so the same texts always give the same ids.
    Encoding adds ``[BOS] ... [EOS]``.
    """
    normalizer, pre_tokenizer = _caption_normalizer(), _caption_pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {token: i for i, token in enumerate([*WORD_SPECIALS, *sorted(words - set(WORD_SPECIALS))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    bos, eos = vocab["[BOS]"], vocab["[EOS]"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]",
        pair="[BOS] $A [EOS] $B:1 [EOS]:1",
        special_tokens=[("[BOS]", bos), ("[EOS]", eos)],
    )
    return tokenizer


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer (every byte representable, so no unknown tokens)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS, BPE_PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_hf_tokenizer_dir(tokenizer: Tokenizer, out_dir: str | Path, **special_tokens: str) -> Path:
    """Save as a transformers tokenizer directory (``AutoTokenizer.from_pretrained(out_dir)`` loads it).

    Written to a sibling temporary directory and renamed into place, so a crash never leaves a
    half-written tokenizer at ``out_dir``.
    """
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens).save_pretrained(str(tmp_dir))
    # transformers 5 records its new class name "TokenizersBackend", which 4.x cannot load; the
    # old name loads in both.
    config_path = tmp_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    return out_dir


def _special_tokens_in(tokenizer_file: Path) -> dict[str, str]:
    """Guess the special tokens of a bare tokenizer.json from common spellings in its vocabulary."""
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    found = {}
    for role, candidates in _SPECIAL_CANDIDATES.items():
        match = next((c for c in candidates if c in vocab), None)
        if match is not None:
            found[role] = match
    return found


def load_text_tokenizer(path_or_dir: str | Path, revision: str = "", key: str = "data.tokenizer") -> Any:
    """Load a transformers fast tokenizer from a ``tokenizer.json`` file, a local tokenizer directory or
    a hub id (resolved into the Hugging Face cache at ``revision``, see ``models.hub``).

    A directory with a ``tokenizer_config.json`` goes through ``AutoTokenizer`` (local files only);
    a bare ``tokenizer.json`` (or a directory holding only one) is wrapped in
    ``PreTrainedTokenizerFast`` with its special tokens recognised by name. A tokenizer without a pad
    token pads with its EOS token, so batches can always be padded.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from dist_tempnet.models.hub import resolve_pretrained

    path = resolve_pretrained(str(path_or_dir), revision, key)
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tokenizer_file = path / "tokenizer.json" if path.is_dir() else path
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{path} holds neither tokenizer_config.json nor tokenizer.json")
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(tokenizer_file), **_special_tokens_in(tokenizer_file)
        )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def template_words(template: str) -> str:
    """A template with its ``{slots}`` blanked out (its literal words, for building a vocabulary)."""
    return re.sub(r"\{[^}]*\}", " ", template)
