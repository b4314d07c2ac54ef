"""Getting data ready before workers start: demo data built once, every path made absolute."""

from __future__ import annotations

import logging
from pathlib import Path

from dist_tempnet.config import Config, ConfigError
from dist_tempnet.data.sources import is_remote

logger = logging.getLogger(__name__)


def prepare_data(cfg: Config) -> None:
    """Build the embedded demo dataset when asked for and missing (in the driver, once); check that
    other sources resolve to an index before any worker starts."""
    from dist_tempnet.data.manifest import resolve_manifest

    for key in ("zero_shot_path", "retrieval_path", "retrieval_images"):
        value = getattr(cfg.eval, key)
        if value and not is_remote(value) and not Path(value).exists():
            raise FileNotFoundError(f"eval.{key}: '{value}' does not exist")
    source = cfg.data.path
    local_dir = isinstance(source, str) and not is_remote(source) and not _has_wildcards(source)
    if local_dir and not Path(source).exists():
        if not cfg.data.demo:
            raise FileNotFoundError(
                f"data.path: '{source}' does not exist; build shards with `dist-tempnet make-shards`, "
                "index shards written elsewhere with `dist-tempnet index-shards`, or set data.demo=true"
            )
        _build_demo(cfg, Path(source))
        return
    path = Path(source) if local_dir else None
    if path is not None and (path / cfg.data.train_split / "dataset.json").is_file():
        if cfg.data.demo and cfg.run.task == "clip":
            _check_demo_long_tail(cfg, path / cfg.data.train_split)
        return
    # An index, a dataset.json, or shards written elsewhere (read from their _stats.json files): a
    # bad source fails here, with a message saying what to do, instead of in every worker.
    manifest = resolve_manifest(source, cfg.data.train_split)
    logger.info("data: %s: %d shards, %d samples", manifest.name, len(manifest.shards), manifest.num_samples)


def _has_wildcards(source: str) -> bool:
    return any(c in source for c in "{}") or "::" in source


def _build_demo(cfg: Config, path: Path) -> None:
    from dist_tempnet.data.demo_clip import make_demo_clip_dataset
    from dist_tempnet.data.demo_text import make_demo_text_dataset

    logger.info("building demo %s dataset in %s ...", cfg.run.task, path)
    if cfg.run.task == "clip":
        make_demo_clip_dataset(
            path,
            num_train=cfg.data.demo_num_train,
            num_eval=cfg.data.demo_num_eval,
            image_size=cfg.data.image_size,
            seed=cfg.run.seed,
            class_zipf=cfg.data.demo_class_zipf,
            caption_noise=cfg.data.demo_caption_noise,
            generic_captions=cfg.data.demo_generic_captions,
        )
    else:
        make_demo_text_dataset(path, seq_len=cfg.data.seq_len, seed=cfg.run.seed)


def _check_demo_long_tail(cfg: Config, split_dir: Path) -> None:
    """Existing demo data must be the long-tailed variant the config asks for, not silently another."""
    from dist_tempnet.data.demo_clip import LongTail, check_long_tail

    d = cfg.data
    try:
        check_long_tail(split_dir, LongTail(d.demo_class_zipf, d.demo_caption_noise, d.demo_generic_captions))
    except ValueError as exc:
        raise ConfigError(f"data.path: {exc}") from exc


def absolutize_paths(cfg: Config) -> None:
    # Ray workers run in their own working directories: every path they read must be absolute.
    cfg.data.path = _absolute(cfg.data.path)
    for key in ("zero_shot_path", "retrieval_path", "retrieval_images"):
        value = getattr(cfg.eval, key)
        if value and value != "imagenet":
            setattr(cfg.eval, key, _absolute(value))
    for key in ("classnames", "templates"):
        value = getattr(cfg.eval, key)
        if value and Path(value).exists():
            setattr(cfg.eval, key, str(Path(value).resolve()))
    # model.pretrained / data.tokenizer may be hub ids: only names that exist here are paths.
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).expanduser().exists():
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).expanduser().resolve())
    if cfg.model.pretrained and Path(cfg.model.pretrained).expanduser().exists():
        cfg.model.pretrained = str(Path(cfg.model.pretrained).expanduser().resolve())
    if "://" not in cfg.run.output_dir:  # an object store URI (s3://bucket/prefix) is absolute already
        cfg.run.output_dir = str(Path(cfg.run.output_dir).resolve())


def _absolute(source: str | list[str]) -> str | list[str]:
    """Local paths made absolute (brace patterns and ``::`` lists too); URLs kept as they are."""
    if isinstance(source, list):
        return [str(_absolute(s)) for s in source]
    if "::" in source:
        return "::".join(str(_absolute(s)) for s in source.split("::"))
    return source if is_remote(source) else str(Path(source).resolve())


def prepare_pretrained(cfg: Config) -> None:
    """Resolve model.pretrained and data.tokenizer in the driver, before any worker starts.

    A hub id is fetched into the Hugging Face cache here once (workers on this node then only read
    the cache); a name that is neither a local path nor a findable hub id fails here with one error.
    """
    from dist_tempnet.models.hub import require_pretrained, resolve_pretrained

    if cfg.model.pretrained:
        require_pretrained(cfg.model.pretrained, cfg.model.revision, "model.pretrained")
    if cfg.data.tokenizer:
        revision = cfg.model.revision if cfg.data.tokenizer == cfg.model.pretrained else ""
        resolve_pretrained(cfg.data.tokenizer, revision, "data.tokenizer")
