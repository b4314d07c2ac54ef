"""Checks in the driver before the MLflow run is created and before Ray starts.

What the workers would otherwise find 30–70 s in (each leaving a FAILED MLflow run behind): the
dataset manifests, the tokenizer and `model.pretrained`. Everything here is cheap: manifests are
small JSON files, the tokenizer and model are checked by their JSON configs, no weights are read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dist_tempnet.config import Config, ConfigError
from dist_tempnet.data.manifest import Manifest, resolve_manifest

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors.index.json")


def _json_file(path: Path, key: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{key}: {path} is not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def check_tokenizer(path: Path, key: str) -> None:
    """A tokenizer directory (tokenizer_config.json and/or tokenizer.json) or a tokenizer.json file."""
    if not path.exists():
        raise ConfigError(f"{key}: no tokenizer at {path}")
    if path.is_file():
        _json_file(path, key)
        return
    found = [f for f in ("tokenizer_config.json", "tokenizer.json") if (path / f).is_file()]
    if not found:
        raise ConfigError(f"{key}: {path} holds neither tokenizer_config.json nor tokenizer.json")
    for name in found:
        _json_file(path / name, key)


def check_pretrained(path: Path, task: str) -> None:
    """A local `save_pretrained` directory with a config transformers knows and weight files."""
    from transformers import AutoConfig

    key = "model.pretrained"
    if not path.is_dir():
        raise ConfigError(f"{key}: '{path}' is not a directory (expected a local save_pretrained dir)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: '{path}' has no config.json (expected a local save_pretrained dir)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/OSError/KeyError here
        raise ConfigError(f"{key}: {path / 'config.json'} cannot be loaded by transformers ({exc})") from exc
    is_clip = config.model_type == "clip"
    if is_clip != (task == "clip"):
        raise ConfigError(
            f"{key}: '{path}' holds a {config.model_type!r} model, but run.task is {task!r} "
            f"(expected {'a CLIP' if task == 'clip' else 'a causal LM'} model)"
        )
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise ConfigError(f"{key}: '{path}' has no weights ({', '.join(WEIGHT_PATTERNS)})")


def _manifest(cfg: Config, split: str, key: str, required: bool) -> Manifest | None:
    try:
        return resolve_manifest(cfg.data.path, split)
    except FileNotFoundError as exc:
        if required:
            raise ConfigError(f"{key}: {exc}") from exc
        return None
    except ValueError as exc:  # ManifestError names the file and the key inside it
        raise ConfigError(f"{key}={split!r}: {exc}") from exc


def preflight(cfg: Config) -> None:
    """Raise ConfigError (naming the key and the file) for inputs the workers could not use."""
    train = _manifest(cfg, cfg.data.train_split, "data.train_split", required=True)
    _manifest(cfg, cfg.data.eval_split, "data.eval_split", required=False)
    from dist_tempnet.models.hub import resolve_pretrained

    # Hub ids resolve to the local snapshot prepare_pretrained fetched (local paths to themselves).
    model = resolve_pretrained(cfg.model.pretrained, cfg.model.revision) if cfg.model.pretrained else None
    if model is not None:
        check_pretrained(model, cfg.run.task)
    if cfg.data.tokenizer:
        check_tokenizer(resolve_pretrained(cfg.data.tokenizer, "", "data.tokenizer"), "data.tokenizer")
    elif cfg.run.task == "lm" and model is not None:
        check_tokenizer(model, "model.pretrained (its tokenizer)")
    elif train.tokenizer_path is not None:
        check_tokenizer(train.tokenizer_path, f"data.tokenizer (from {train.path})")
    elif cfg.run.task == "clip":
        raise ConfigError(f"data.tokenizer: no tokenizer configured and {train.path} names none")
