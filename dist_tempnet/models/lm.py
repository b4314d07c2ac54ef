"""transformers causal LMs from presets, a local pretrained directory or a hub id."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from dist_tempnet.models.common import make_scalar_params_1d, require_pretrained_dir

# name -> (config class, kwargs). `vocab_size: None` means "take it from the tokenizer".
LM_PRESETS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama_tiny": (
        LlamaConfig,
        dict(
            vocab_size=None,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
    ),
    "gpt2_tiny": (GPT2Config, dict(vocab_size=None, n_embd=128, n_layer=2, n_head=4, n_positions=512)),
    "gpt2_125m": (GPT2Config, dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)),
    # Llama-3.2-1B shape (1.24B parameters, tied embeddings).
    "llama_1b": (
        LlamaConfig,
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=True,
        ),
    ),
    # A 1.3B LLaMA-style model for from-scratch pretraining with ZeRO-3.
    "llama_1.3b": (
        LlamaConfig,
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5504,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
    # LLaMA-2-7B shape (6.74B parameters); the paper's TempNet-only setting freezes it.
    "llama2_7b": (
        LlamaConfig,
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
}


def lm_config(
    preset: str,
    overrides: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    special_ids: dict[str, int] | None = None,
) -> PretrainedConfig:
    if preset not in LM_PRESETS:
        raise ValueError(f"model.preset: unknown LM preset {preset!r}; known: {', '.join(LM_PRESETS)}")
    cls, kwargs = LM_PRESETS[preset]
    kwargs = dict(kwargs)
    if kwargs.get("vocab_size") is None:
        if vocab_size is None:
            raise ValueError(
                f"model.preset {preset!r} takes its vocabulary size from the tokenizer; none given"
            )
        kwargs["vocab_size"] = vocab_size
    kwargs.update(special_ids or {})
    kwargs.update(overrides or {})
    return cls(**kwargs)


def build_causal_lm(
    preset: str = "llama_tiny",
    pretrained: str = "",
    overrides: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    revision: str = "",
    dtype: torch.dtype = torch.float32,
    **config_kwargs: Any,
) -> nn.Module:
    """A causal LM from a preset (random init) or `pretrained` (local dir or hub id, see models.hub).

    Pretrained weights are loaded directly in `dtype` (the training dtype: bf16 runs never hold an
    fp32 copy of a 7B model per rank).
    """
    if pretrained:
        path = require_pretrained_dir(pretrained, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), attn_implementation=attn_implementation, local_files_only=True, dtype=dtype
        )
    else:
        cfg = lm_config(preset, overrides, **config_kwargs)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    make_scalar_params_1d(model)
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("the fused TempNet loss assumes an LM head without bias; this model's head has one")
    return model


def count_parameters(preset: str, vocab_size: int | None = None) -> int:
    """Exact parameter count of a preset, built on the meta device (no memory)."""
    cfg = lm_config(preset, vocab_size=vocab_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())
