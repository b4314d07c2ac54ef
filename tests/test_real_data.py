"""Shards as people have them: img2dataset layout, URLs, the shard index, make-shards --pairs."""

from __future__ import annotations

import functools
import io
import json
import re
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dist_tempnet.data import eval_batches, read_manifest, resolve_manifest
from dist_tempnet.data.index import index_shards
from dist_tempnet.data.sources import expand_source, open_url
from dist_tempnet.data.text_tokenizer import build_word_level_tokenizer, load_text_tokenizer


def jpeg(value: int, size: tuple[int, int] = (20, 14)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_img2dataset_shard(
    directory: Path, index: int, count: int, *, stats: bool = True, broken: dict[int, str] | None = None
) -> list[str]:
    """One shard as img2dataset writes it: NNNNNNNNN.tar with .jpg/.txt/.json per sample and
    NNNNNNNNN_stats.json beside it. ``broken``: position -> 'image' (corrupt jpg) or 'caption' (none)."""
    broken = broken or {}
    name = f"{index:09d}"
    keys = []
    with wds.TarWriter(str(directory / f"{name}.tar"), encoder=False) as tar:
        for i in range(count):
            key = f"{index:05d}{i:04d}"
            keys.append(key)
            sample = {
                "__key__": key,
                "jpg": b"not a jpeg" if broken.get(i) == "image" else jpeg(10 * i + index),
                "json": json.dumps({"key": key, "status": "success", "width": 20}).encode(),
            }
            if broken.get(i) != "caption":
                sample["txt"] = f"picture {i} of shard {index}".encode()
            tar.write(sample)
    if stats:
        (directory / f"{name}_stats.json").write_text(
            json.dumps(
                {"count": count + 2, "successes": count, "failed_to_download": 2, "failed_to_resize": 0}
            )
        )
    return keys


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served on 127.0.0.1 by http.server in a thread: (directory, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(build_word_level_tokenizer(["picture of shard"] + [str(i) for i in range(20)]).to_str())
    return load_text_tokenizer(path)


def test_sources_expand_dirs_braces_lists(tmp_path: Path) -> None:
    for i in range(3):
        write_img2dataset_shard(tmp_path, i, 2)
    names = [str(tmp_path / f"{i:09d}.tar") for i in range(3)]
    assert expand_source(tmp_path) == names
    assert expand_source(str(tmp_path / "{000000000..000000002}.tar")) == names
    assert expand_source([names[2], names[0]]) == [names[2], names[0]]
    assert expand_source(f"{names[0]}::{names[1]}") == names[:2]
    assert expand_source("pipe:cat x.tar") == ["pipe:cat x.tar"]
    with pytest.raises(ValueError, match="more than once"):
        expand_source([names[0], names[0]])
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        expand_source(_empty(tmp_path))
    # Object stores go through fsspec; a missing optional package is named.
    with pytest.raises(ImportError, match="s3fs"):
        open_url("s3://some-bucket/shards/000000000.tar")
    # pipe: goes through webdataset's gopen.
    with open_url(f"pipe:cat {names[1]}") as handle:
        assert handle.read() == Path(names[1]).read_bytes()


def _empty(tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def test_index_over_http_counts_and_skips_bad_samples(http_root, tokenizer) -> None:
    root, url = http_root
    write_img2dataset_shard(root, 0, 5, broken={1: "image", 3: "caption"})
    write_img2dataset_shard(root, 1, 4)
    write_img2dataset_shard(root, 2, 3, stats=False)  # counted by reading it
    index_dir = root.parent / "index"
    manifest = index_shards(f"{url}/{{000000000..000000002}}.tar", index_dir, workers=2)
    assert [s.url for s in manifest.shards] == [f"{url}/{i:09d}.tar" for i in range(3)]
    assert [(s.id_start, s.id_stop) for s in manifest.shards] == [(0, 5), (5, 9), (9, 12)]
    assert [s.failed for s in manifest.shards] == [2, 2, 0]  # img2dataset's failed downloads
    raw = json.loads((index_dir / "dataset.json").read_text())
    assert [s["counted_from"] for s in raw["shards"]] == ["stats", "stats", "read"]

    # The index itself can be read by URL too; shards are read through curl (gopen), not open().
    (root / "index").mkdir()
    (root / "index" / "dataset.json").write_bytes((index_dir / "dataset.json").read_bytes())
    remote = resolve_manifest(f"{url}/index/dataset.json")
    assert remote.shards == manifest.shards
    with pytest.warns(RuntimeWarning, match="000000000.tar: sample '000000001'"):
        stream = eval_batches(remote, batch_size=4, tokenizer=tokenizer, image_size=8)
        batches = list(stream)
    ids = [i for b in batches for i in b["sample_ids"].tolist()]
    # Slots 1 (corrupt jpg) and 3 (no caption) are skipped, counted, and keep their ids unused.
    assert ids == [0, 2, 4, *range(5, 12)]
    assert stream.corrupt_skipped == 2
    assert batches[0]["pixel_values"].shape == (4, 3, 8, 8)


def test_index_is_deterministic_and_appending_keeps_ids(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        write_img2dataset_shard(shards, i, 3 + i, stats=i != 1)
    first = index_shards(shards, tmp_path / "a", workers=2)
    again = index_shards(shards, tmp_path / "b", workers=1)
    assert (tmp_path / "a" / "dataset.json").read_text().replace(str(tmp_path / "a"), "") == (
        tmp_path / "b" / "dataset.json"
    ).read_text().replace(str(tmp_path / "b"), "")
    assert first.shards == again.shards and first.num_samples == 12

    write_img2dataset_shard(shards, 3, 2)
    write_img2dataset_shard(shards, 4, 1, stats=False)
    grown = index_shards(shards, tmp_path / "a")
    assert grown.shards[:3] == first.shards  # old ids never change
    assert [(s.id_start, s.id_stop) for s in grown.shards[3:]] == [(12, 14), (14, 15)]
    assert grown.num_samples == 15


def test_unindexed_dir_with_stats_trains_without_reading(tmp_path: Path) -> None:
    for i in range(2):
        write_img2dataset_shard(tmp_path, i, 3)
    manifest = resolve_manifest(tmp_path, "train")
    assert manifest.num_samples == 6 and manifest.version == 2
    write_img2dataset_shard(tmp_path, 2, 3, stats=False)
    with pytest.raises(FileNotFoundError, match="index-shards"):
        resolve_manifest(tmp_path, "train")
    # A demo dataset.json is one form of the same index: one reader for both.
    assert read_manifest(_demo(tmp_path)).version == 1


def _demo(tmp_path: Path) -> Path:
    from dist_tempnet.data import write_image_text_shards

    return write_image_text_shards([(np.zeros((4, 4, 3), np.uint8), "a")], tmp_path / "demo", "train")


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_make_shards_from_pairs(tmp_path: Path, tokenizer, suffix: str, capsys) -> None:
    import pandas as pd

    from dist_tempnet.commands.cli import main

    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(7):
        Image.fromarray(np.full((30, 50, 3), 30 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"file": f"imgs/{i}.png", "text": f"picture {i}"})
    (tmp_path / "imgs" / "3.png").write_bytes(b"corrupt")  # undecodable: skipped and counted
    rows.append({"file": "imgs/missing.png", "text": "picture 9"})  # missing: skipped and counted
    table = pd.DataFrame(rows)
    pairs = tmp_path / f"pairs{suffix}"
    {".csv": lambda: table.to_csv(pairs, index=False), ".parquet": lambda: table.to_parquet(pairs),
     ".jsonl": lambda: table.to_json(pairs, orient="records", lines=True)}[suffix]()  # fmt: skip
    out = tmp_path / "shards"
    argv = ["make-shards", "--pairs", str(pairs), "--out", str(out), "--image-column", "file",
            "--caption-column", "text", "--image-size", "16", "--samples-per-shard", "3"]  # fmt: skip
    assert main(argv) == 0
    stats = [json.loads((out / f"{i:09d}_stats.json").read_text()) for i in range(3)]
    assert [s["successes"] for s in stats] == [3, 2, 1]
    assert sum(s["failed_to_resize"] for s in stats) == 1 and stats[2]["failed_to_download"] == 1
    manifest = resolve_manifest(out, "train")  # indexed: trainable as it is
    assert manifest.num_samples == 6 and [s.num_samples for s in manifest.shards] == [3, 2, 1]
    batch = next(iter(eval_batches(manifest, batch_size=6, tokenizer=tokenizer)))
    assert batch["pixel_values"].shape == (6, 3, 16, 16)
    assert batch["sample_ids"].tolist() == list(range(6))
    # A wrong column is one line naming the file and the columns it has, exit 2 (no traceback).
    assert main(["make-shards", "--pairs", str(pairs), "--out", str(tmp_path / "other")]) == 2
    assert re.search(
        r"pairs\.\w+: no column\(s\) \['image', 'caption'\]; it has \['file', 'text'\]",
        capsys.readouterr().err,
    )


@pytest.mark.multiproc
def test_resume_after_kill_on_url_shards_then_eval_logs_benchmarks(http_root, tmp_path: Path) -> None:
    """img2dataset shards read over HTTP: a worker is SIGKILLed mid-epoch, the run resumes from its
    checkpoint and still trains on every sample of the epoch exactly once; then `dist-tempnet eval`
    runs ImageFolder zero-shot and Karpathy retrieval on the checkpoint and logs them to MLflow."""
    from mlflow.tracking import MlflowClient

    from dist_tempnet.commands.cli import main
    from dist_tempnet.runtime.faults import seen_ids_by_epoch
    from tests.test_checkpoint import _train

    root, url = http_root
    for shard in range(8):  # 8 shards x 8 samples; 2 ranks x 4 shards; 16 per step -> 4 steps per epoch
        write_img2dataset_shard(root, shard, 8)
    index_dir = tmp_path / "index"
    index_shards(f"{url}/{{000000000..000000007}}.tar", index_dir)
    tok = tmp_path / "tokenizer.json"
    words = ["picture of shard red green blue a photo square"] + [str(i) for i in range(10)]
    tok.write_text(build_word_level_tokenizer(words).to_str())
    ckpt, seen, once = tmp_path / "ckpt", tmp_path / "seen", tmp_path / "once"
    extra = [f"data.tokenizer={tok}", "data.train_crop_scale=[0.5, 1.0]"]
    env = {"DIST_TEMPNET_SEEN_IDS": str(seen), "DIST_TEMPNET_FAULT": f"kill_rank=1,step=3,once_file={once}"}
    with pytest.raises(Exception, match="(?i)signal|exit"):
        _train(2, index_dir, ckpt, steps=4, env=env, extra=extra)
    resumed = _train(2, index_dir, ckpt, steps=4, env=env, extra=extra)
    assert [r["resumed_step"] for r in resumed] == [2, 2] and resumed[0]["step"] == 4
    by_epoch = seen_ids_by_epoch(seen)
    assert sorted(by_epoch[0]) == list(range(64)), "a sample was skipped or repeated across the kill"

    tree = _color_tree(tmp_path / "val")
    karpathy = _karpathy(tmp_path / "flickr")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["eval", "--checkpoint", str(ckpt), "--zero-shot", str(tree), "--templates", "simple",
            "--retrieval", str(karpathy), "--log-to-mlflow", "--new-run", "--tracking-uri", uri]  # fmt: skip
    assert main(argv) == 0
    (run,) = MlflowClient(tracking_uri=uri).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=uri).search_experiments()]
    )
    metrics = run.data.metrics
    assert metrics["eval/zeroshot/num_images"] == 6 and 0 <= metrics["eval/zeroshot/top1"] <= 1
    assert metrics["eval/retrieval/num_captions"] == 6
    assert metrics["eval/retrieval/t2i_recall_at_5"] == 1.0  # 3 images: the top 5 holds them all


def _color_tree(root: Path) -> Path:
    for name, value in (("red", (200, 0, 0)), ("green", (0, 200, 0)), ("blue", (0, 0, 200))):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(root / name / f"{i}.jpg")
    return root


def _karpathy(root: Path) -> Path:
    root.mkdir()
    images = []
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 60 * i, np.uint8)).save(root / f"{i}.jpg")
        sentences = [{"raw": f"a photo {i}"}, {"raw": f"picture {i} square"}]
        images.append({"filename": f"{i}.jpg", "split": "test", "sentences": sentences})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    return root / "dataset_flickr30k.json"


def test_train_crop_is_seeded_per_sample_and_epoch_and_respects_scale() -> None:
    import random

    from dist_tempnet.data.augment import TrainCrop, random_resized_box

    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    crop = TrainCrop(16, (0.9, 1.0), seed=1)
    same = np.asarray(crop(image, sample_id=5, epoch=0))
    assert same.shape == (16, 16, 3) and np.array_equal(same, np.asarray(crop(image, 5, 0)))
    assert not np.array_equal(np.asarray(TrainCrop(16, (0.1, 0.2))(image, 5, 0)), same)
    rng = random.Random(0)
    for _ in range(200):
        _, _, w, h = random_resized_box(60, 40, (0.5, 0.6), rng)
        assert 0.45 <= w * h / 2400 <= 0.65  # area share within the scale (up to rounding)


def test_data_path_accepts_a_list(tmp_path: Path) -> None:
    from dist_tempnet.config import load_config

    cfg = load_config(None, [f"data.path=[{tmp_path}/a.tar, {tmp_path}/b.tar]"])
    assert cfg.data.path == [f"{tmp_path}/a.tar", f"{tmp_path}/b.tar"]
    assert load_config(None, ["data.path=shards/{000..009}.tar"]).data.path == "shards/{000..009}.tar"
