"""Model builders: transformers CLIP and causal LMs, from presets or local pretrained dirs."""

from dist_tempnet.models.common import make_scalar_params_1d

__all__ = ["make_scalar_params_1d"]
