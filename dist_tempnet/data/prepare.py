"""Getting data ready before workers start: demo data built once, every path made absolute."""

from __future__ import annotations

import logging
from pathlib import Path

from dist_tempnet.config import Config

logger = logging.getLogger(__name__)


def prepare_data(cfg: Config) -> None:
    """Build the embedded demo dataset when asked for and missing (in the driver, once)."""
    from dist_tempnet.data.demo_clip import make_demo_clip_dataset
    from dist_tempnet.data.demo_text import make_demo_text_dataset

    path = Path(cfg.data.path)
    if (path / cfg.data.train_split / "dataset.json").is_file() or (path / "dataset.json").is_file():
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
        )
    else:
        make_demo_text_dataset(path, seq_len=cfg.data.seq_len, seed=cfg.run.seed)


def absolutize_paths(cfg: Config) -> None:
    # Ray workers run in their own working directories: every path they read must be absolute.
    cfg.data.path = str(Path(cfg.data.path).resolve())
    if cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).resolve())
    if cfg.model.pretrained:
        cfg.model.pretrained = str(Path(cfg.model.pretrained).resolve())
    if "://" not in cfg.run.output_dir:  # an object store URI (s3://bucket/prefix) is absolute already
        cfg.run.output_dir = str(Path(cfg.run.output_dir).resolve())
