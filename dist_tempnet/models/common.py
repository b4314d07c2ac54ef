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


def require_pretrained_dir(path: str, key: str = "model.pretrained") -> Path:
    """A local directory saved with `save_pretrained`; hubs are not reachable from our workers."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{key}: '{p}' is not a directory (expected a local save_pretrained dir)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{key}: '{p}' has no config.json (expected a local save_pretrained dir)")
    return p
