"""Getting data ready before workers start: demo data built once, every path made absolute."""

from __future__ import annotations

import logging
from pathlib import Path

from dist_tempnet.config import Config, ConfigError

logger = logging.getLogger(__name__)


def prepare_data(cfg: Config) -> None:
    """Build the embedded demo dataset when asked for and missing (in the driver, once)."""
    from dist_tempnet.data.demo_clip import make_demo_clip_dataset
    from dist_tempnet.data.demo_text import make_demo_text_dataset

    path = Path(cfg.data.path)
    if (path / cfg.data.train_split / "dataset.json").is_file() or (path / "dataset.json").is_file():
        if cfg.data.demo and cfg.run.task == "clip" and (path / cfg.data.train_split).is_dir():
            _check_demo_long_tail(cfg, path / cfg.data.train_split)
        return
    if not cfg.data.demo:
        raise FileNotFoundError(
            f"data.path: '{path}' holds no dataset.json; build shards with `dist-tempnet make-shards` "
            "or set data.demo=true for the embedded demo data"
        )
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
    cfg.data.path = str(Path(cfg.data.path).resolve())
    if cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).resolve())
    if cfg.model.pretrained:
        cfg.model.pretrained = str(Path(cfg.model.pretrained).resolve())
    cfg.run.output_dir = str(Path(cfg.run.output_dir).resolve())
