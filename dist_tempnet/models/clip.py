"""transformers CLIPModel from a preset or a local pretrained directory."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

from dist_tempnet.models.common import make_scalar_params_1d, require_pretrained_dir

# Tiny enough for a 2-core CPU to learn the demo shapes in a couple of minutes.
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "clip_tiny": {
        "projection_dim": 64,
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 8,
            "image_size": 32,
        },
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
        },
    },
    # OpenAI ViT-B/32 shapes (151M parameters with the 49408-token vocabulary).
    "clip_vit_b32": {
        "projection_dim": 512,
        "vision_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "patch_size": 32,
            "image_size": 224,
        },
        "text_config": {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
            "vocab_size": 49408,
        },
    },
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def clip_config(
    preset: str,
    overrides: dict[str, Any] | None = None,
    *,
    vocab_size: int | None = None,
    special_ids: dict[str, int] | None = None,
    image_size: int | None = None,
    max_text_len: int | None = None,
) -> CLIPConfig:
    if preset not in CLIP_PRESETS:
        raise ValueError(f"model.preset: unknown CLIP preset {preset!r}; known: {', '.join(CLIP_PRESETS)}")
    spec = copy.deepcopy(CLIP_PRESETS[preset])  # the presets are module constants: never mutate them
    text = spec["text_config"]
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    if max_text_len is not None:
        text["max_position_embeddings"] = max(text.get("max_position_embeddings", 0), max_text_len)
    if image_size is not None:
        spec["vision_config"]["image_size"] = image_size
    for name, value in (special_ids or {}).items():
        text[name] = value
    spec = _merge(spec, overrides or {})
    return CLIPConfig(text_config=spec.pop("text_config"), vision_config=spec.pop("vision_config"), **spec)


def build_clip_model(
    preset: str = "clip_tiny",
    pretrained: str = "",
    overrides: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    revision: str = "",
    **config_kwargs: Any,
) -> CLIPModel:
    """A CLIPModel ready for DeepSpeed: scalars made 1-dim (see make_scalar_params_1d)."""
    if pretrained:
        path = require_pretrained_dir(pretrained, revision=revision)
        model = CLIPModel.from_pretrained(
            str(path), attn_implementation=attn_implementation, local_files_only=True
        )
    else:
        cfg = clip_config(preset, overrides, **config_kwargs)
        cfg._attn_implementation = attn_implementation
        model = CLIPModel(cfg)
    make_scalar_params_1d(model)
    return model


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def encode_images(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    return _pooled(model.get_image_features(pixel_values=pixel_values))


def encode_texts(
    model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    return _pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
