"""Helpers shared by the CLIP and LM builders."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def make_scalar_params_1d(module: nn.Module) -> list[str]:
    """Reshape every 0-dim parameter to shape [1], in place; return their names.

    DeepSpeed 0.19.8's `_broadcast_model` views each parameter as bytes and crashes on 0-dim
    tensors (HF CLIP's `logit_scale`, any scalar temperature). Broadcasting keeps the math the same.
    """
    changed = []
    for mod_name, mod in module.named_modules():
        for name, param in list(mod.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(mod, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
                changed.append(f"{mod_name}.{name}" if mod_name else name)
    return changed


def require_pretrained_dir(name: str, key: str = "model.pretrained", revision: str = "") -> Path:
    """A local model directory for `name`: a `save_pretrained` directory or a hub id (see models.hub)."""
    from dist_tempnet.models.hub import require_pretrained

    return require_pretrained(name, revision, key)
