"""dist_tempnet: TempNet + DRO robust losses, trained with Ray, DeepSpeed ZeRO and MLflow.

Importing the package is cheap and never imports ray, mlflow or deepspeed: only the launcher,
tracking and engine modules do, so the math runs anywhere torch does. Public names resolve lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LMTempNet": "dist_tempnet.tempnet",
    "CLIPTempNet": "dist_tempnet.tempnet",
    "tempnet_lm_loss": "dist_tempnet.losses.lm",
    "GlobalDROContrastiveLoss": "dist_tempnet.losses.contrastive",
    "load_config": "dist_tempnet.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dist_tempnet' has no attribute {name!r}")
