"""Tests for dist_tempnet.data: shard writing, manifests, demo datasets, batch streams."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_tempnet.data import (
    CLIP_MEAN,
    CLIP_STD,
    CorruptShardError,
    ManifestError,
    clip_batches,
    eval_batches,
    load_text_tokenizer,
    make_demo_clip_dataset,
    make_demo_text_dataset,
    make_token_shards,
    read_manifest,
    resolve_manifest,
    token_batches,
    write_image_text_shards,
)
from dist_tempnet.data.collate import normalize_pixels
from dist_tempnet.data.demo_clip import CLASS_NAMES, PROMPT_TEMPLATES
from dist_tempnet.data.shards import ShardSetWriter
from dist_tempnet.data.text_tokenizer import (
    BPE_EOS,
    BPE_PAD,
    build_word_level_tokenizer,
    save_hf_tokenizer_dir,
    train_byte_level_bpe,
)

NUM_TRAIN, SHARD_SIZE, BATCH = 128, 16, 8  # 8 train shards: divisible by 2 and 4 ranks x 2 workers


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip")
    return make_demo_clip_dataset(
        root, num_train=NUM_TRAIN, num_eval=40, image_size=16, samples_per_shard=SHARD_SIZE, seed=0
    )


@pytest.fixture(scope="module")
def caption_tokenizer(clip_root: Path):
    return load_text_tokenizer(clip_root / "tokenizer.json")


@pytest.fixture()
def clip_copy(clip_root: Path, tmp_path: Path) -> Path:
    """A private copy of the demo dataset that a test may damage."""
    return Path(shutil.copytree(clip_root, tmp_path / "clip"))


def take(stream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


def ids_of(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["sample_ids"].tolist()]


# ------------------------------------------------------------------------------ writer and manifest


def _solid_image(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def test_writer_round_trip_ids_captions_pixels(tmp_path: Path) -> None:
    samples = [(_solid_image(10 * i), f"caption number {i}", i % 3) for i in range(10)]
    manifest_path = write_image_text_shards(
        samples, tmp_path, "train", samples_per_shard=4, metadata={"class_names": ["a", "b", "c"]}
    )
    manifest = read_manifest(manifest_path)
    assert manifest.num_samples == 10 and (manifest.id_start, manifest.id_stop) == (0, 10)
    assert [s.num_samples for s in manifest.shards] == [4, 4, 2]
    assert [(s.id_start, s.id_stop) for s in manifest.shards] == [(0, 4), (4, 8), (8, 10)]
    assert manifest.image_size == 8 and manifest.metadata["class_names"] == ["a", "b", "c"]
    assert set(manifest.fields) == {"id", "png", "txt", "cls"}

    # Raw tar layout: key = zero-padded id, an id field equal to it, the caption as utf-8.
    with tarfile.open(manifest.shards[1].path) as tar:
        names = tar.getnames()
        assert "000000000004.id" in names and "000000000004.png" in names
        assert tar.extractfile("000000000005.id").read() == b"5"
        assert tar.extractfile("000000000005.txt").read() == b"caption number 5"

    tokenizer = build_word_level_tokenizer(["caption number"] + [str(i) for i in range(10)])
    (tmp_path / "tok.json").write_text(tokenizer.to_str())
    batches = list(eval_batches(tmp_path, "train", batch_size=4, tokenizer=tmp_path / "tok.json"))
    assert ids_of(batches) == list(range(10))
    pixels = torch.cat([b["pixel_values"] for b in batches])
    assert pixels.dtype == torch.uint8 and pixels.shape == (10, 3, 8, 8)  # normalized on the device
    normalized = normalize_pixels(pixels)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    restored = (normalized * std + mean) * 255
    expected = torch.tensor([10.0 * i for i in range(10)]).view(10, 1, 1, 1).expand_as(restored)
    assert torch.allclose(restored, expected, atol=1e-3)
    assert torch.cat([b["labels"] for b in batches]).tolist() == [i % 3 for i in range(10)]
    first = batches[0]
    assert first["input_ids"].dtype == torch.long
    assert first["attention_mask"].shape == first["input_ids"].shape


def test_writer_accepts_pil_and_encoded_images(tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.fromarray(_solid_image(200, 12)).save(jpeg, format="JPEG")
    samples = [{"image": Image.fromarray(_solid_image(5, 12)), "caption": "pil"}, (jpeg.getvalue(), "jpeg")]
    manifest = read_manifest(write_image_text_shards(samples, tmp_path, "train", samples_per_shard=8))
    assert {"png", "jpg"} <= set(manifest.fields) and manifest.image_size == 12


def test_writer_refuses_to_overwrite_and_cleans_up(tmp_path: Path) -> None:
    six = [(_solid_image(i), "x") for i in range(6)]
    write_image_text_shards(six, tmp_path, "train", samples_per_shard=2)
    with pytest.raises(FileExistsError, match=str(tmp_path / "train")):
        write_image_text_shards([(_solid_image(0), "y")], tmp_path, "train", samples_per_shard=2)
    write_image_text_shards([(_solid_image(0), "y")], tmp_path, "train", samples_per_shard=2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["dataset.json", "train-000000.tar"]


def test_interrupted_write_leaves_no_manifest_or_tmp(tmp_path: Path) -> None:
    def failing():
        yield _solid_image(1), "fine"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_image_text_shards(failing(), tmp_path, "train", samples_per_shard=4)
    assert list((tmp_path / "train").iterdir()) == []


def _mutate(raw: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        raw = raw[int(part)] if part.isdigit() else raw[part]
    if value is KeyError:
        del raw[last]
    else:
        raw[last] = value


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("num_samples", KeyError, "'num_samples'"),
        ("num_samples", 7, "'num_samples'"),
        ("kind", "video", "'kind'"),
        ("version", 99, "'version'"),
        ("shards.1.id_range", [0, 16], "'shards[1].id_range'"),
        ("shards.0.num_samples", "many", "'shards[0].num_samples'"),
        ("shards.2.path", KeyError, "'shards[2].path'"),
        ("metadata.image_size", "big", "'metadata.image_size'"),
        ("metadata.prompt_templates", ["no slot"], "'metadata.prompt_templates'"),
        ("fields", ["id", "png"], "'fields'"),
    ],
)
def test_manifest_validation_names_file_and_key(clip_copy: Path, path: str, value, named: str) -> None:
    manifest_path = clip_copy / "train" / "dataset.json"
    raw = json.loads(manifest_path.read_text())
    _mutate(raw, path, value)
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest_path)
    assert str(manifest_path) in str(info.value) and named in str(info.value)


def test_manifest_not_json_and_missing(clip_copy: Path) -> None:
    manifest_path = clip_copy / "train" / "dataset.json"
    manifest_path.write_text("{not json")
    with pytest.raises(ManifestError, match=str(manifest_path)):
        read_manifest(clip_copy / "train")
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        read_manifest(clip_copy / "nowhere")


def test_resolve_manifest_forms(clip_root: Path) -> None:
    by_root = resolve_manifest(clip_root, "eval")
    assert by_root == resolve_manifest(clip_root / "eval")
    assert by_root == resolve_manifest(clip_root / "eval" / "dataset.json")
    assert by_root.num_samples == 40 and by_root.tokenizer_path == (clip_root / "tokenizer.json").resolve()
    with pytest.raises(ValueError, match="split 'train'"):
        resolve_manifest(clip_root / "eval", "train")
    # Without an explicit split: a root means the default split, anything else is taken as it is.
    assert resolve_manifest(clip_root, default_split="train").split == "train"
    train = resolve_manifest(clip_root / "train")
    assert eval_batches(train, batch_size=4).num_samples == NUM_TRAIN


# ------------------------------------------------------------------------------------- training stream


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 0), (4, 0), (2, 2), (4, 2)])
def test_ranks_partition_each_epoch(clip_root, caption_tokenizer, world_size: int, num_workers: int) -> None:
    per_rank = NUM_TRAIN // world_size // BATCH  # batches per rank per epoch (shards divide evenly)
    epochs: list[list[list[int]]] = [[], []]  # [epoch][rank] -> ids in delivery order
    for rank in range(world_size):
        with clip_batches(
            clip_root,
            "train",
            BATCH,
            rank,
            world_size,
            caption_tokenizer,
            num_workers=num_workers,
            shuffle_buffer=32,
            seed=3,
        ) as stream:
            for epoch in range(2):
                epochs[epoch].append(ids_of(take(stream, per_rank)))
                assert stream.epoch == epoch
            assert stream.samples_seen == 2 * per_rank * BATCH and stream.corrupt_skipped == 0
    for per_rank_ids in epochs:
        flat = [i for ids in per_rank_ids for i in ids]
        assert sorted(flat) == list(range(NUM_TRAIN))  # union is the dataset, no duplicates
    assert epochs[0] != epochs[1]  # reshuffled: other shards per rank and/or another sample order


def test_epoch_reshuffle_deterministic_and_resumable(clip_root, caption_tokenizer) -> None:
    per_epoch = NUM_TRAIN // BATCH
    with clip_batches(clip_root, "train", BATCH, tokenizer=caption_tokenizer, seed=7) as stream:
        run = ids_of(take(stream, 2 * per_epoch))
    first, second = run[:NUM_TRAIN], run[NUM_TRAIN:]
    assert sorted(first) == sorted(second) == list(range(NUM_TRAIN)) and first != second
    with clip_batches(clip_root, "train", BATCH, tokenizer=caption_tokenizer, seed=7, epoch_start=1) as s:
        assert ids_of(take(s, per_epoch)) == second
    with clip_batches(clip_root, "train", BATCH, tokenizer=caption_tokenizer, seed=8) as stream:
        assert ids_of(take(stream, per_epoch)) != first


def test_uneven_shards_stream_is_endless_with_full_batches(clip_root, caption_tokenizer) -> None:
    # 8 shards over 3 ranks: ranks get 3/3/2 shards, yet every rank keeps producing full batches.
    for rank in range(3):
        with clip_batches(clip_root, "train", 24, rank, 3, caption_tokenizer, shuffle_buffer=8) as stream:
            batches = take(stream, 12)
            assert all(b["sample_ids"].shape == (24,) for b in batches) and stream.epoch >= 4


def test_batch_keys_dtypes_and_resize(clip_root, caption_tokenizer) -> None:
    stream = clip_batches(clip_root, "train", 4, tokenizer=caption_tokenizer, image_size=24, max_text_len=20)
    with stream:
        batch = next(stream)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "sample_ids", "labels"}
    assert batch["pixel_values"].shape == (4, 3, 24, 24) and batch["pixel_values"].dtype == torch.uint8
    assert batch["input_ids"].shape == (4, 20) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and batch["sample_ids"].dtype == torch.long
    assert (batch["input_ids"][:, 0] == caption_tokenizer.bos_token_id).all()


def test_too_few_shards_is_a_clear_error(clip_root, caption_tokenizer) -> None:
    with pytest.raises(ValueError, match="8 shards cannot feed 4 ranks x 3 workers"):
        clip_batches(clip_root, "train", BATCH, 0, 4, caption_tokenizer, num_workers=3)


# --------------------------------------------------------------------------------------- bad shards


def _shard(root: Path, index: int) -> Path:
    return root / "train" / f"train-{index:06d}.tar"


def test_missing_shard_fails_before_iteration(clip_copy: Path, caption_tokenizer) -> None:
    _shard(clip_copy, 5).unlink()
    with pytest.raises(FileNotFoundError, match=str(_shard(clip_copy, 5))):
        clip_batches(clip_copy, "train", BATCH, tokenizer=caption_tokenizer)


def test_truncated_shard_error_and_counted_skip(clip_copy: Path, caption_tokenizer) -> None:
    shard = _shard(clip_copy, 2)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    with pytest.raises(CorruptShardError, match=f"{shard}.*truncated"):
        clip_batches(clip_copy, "train", BATCH, tokenizer=caption_tokenizer)
    with pytest.warns(RuntimeWarning, match=str(shard)):
        stream = clip_batches(clip_copy, "train", BATCH, tokenizer=caption_tokenizer, allow_corrupt=True)
        with stream:
            ids = ids_of(take(stream, 20))
    assert stream.corrupt_skipped >= 1
    lost = set(range(32, 48)) - set(ids)  # shard 2 holds ids 32..47; its tail is unreadable
    assert lost and set(ids) - set(range(NUM_TRAIN)) == set()


def test_garbage_shard_names_url(clip_copy: Path, caption_tokenizer) -> None:
    shard = _shard(clip_copy, 6)
    # Same size as before, so the up-front size check passes and only reading can tell.
    shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))
    with clip_batches(clip_copy, "train", BATCH, tokenizer=caption_tokenizer) as stream:
        with pytest.raises(CorruptShardError, match=f"{shard}: unreadable tar data"):
            take(stream, 40)
    # Raised in a DataLoader worker, it still reaches the caller with the shard named.
    with clip_batches(clip_copy, "train", BATCH, tokenizer=caption_tokenizer, num_workers=2) as stream:
        with pytest.raises(CorruptShardError, match=str(shard)):
            take(stream, 40)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        stream = clip_batches(clip_copy, "train", BATCH, tokenizer=caption_tokenizer, allow_corrupt=True)
        with stream:
            ids = ids_of(take(stream, 28))  # two epochs' worth of the 112 readable samples
    assert stream.corrupt_skipped == 2 and not set(ids) & set(range(96, 112))


def test_undecodable_image_is_named_or_skipped(tmp_path: Path, caption_tokenizer) -> None:
    with ShardSetWriter(tmp_path, "train", "image_text", samples_per_shard=3) as writer:
        for i in range(6):
            png = b"not a png" if i == 4 else _png(i)
            writer.add({"png": png, "txt": b"a red circle"})
        writer.finish({"image_size": 8})
    with pytest.raises(CorruptShardError, match=r"train-000001.tar: sample '000000000004': cannot decode"):
        list(eval_batches(tmp_path, "train", 2, tokenizer=caption_tokenizer))
    with pytest.warns(RuntimeWarning):
        passes = eval_batches(tmp_path, "train", 2, tokenizer=caption_tokenizer, allow_corrupt=True)
        assert ids_of(list(passes)) == [0, 1, 2, 3, 5] and passes.corrupt_skipped == 1


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_solid_image(value)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_all_shards_corrupt_raises_instead_of_hanging(clip_copy: Path, caption_tokenizer) -> None:
    for index in range(NUM_TRAIN // SHARD_SIZE):
        _shard(clip_copy, index).write_bytes(b"\0garbage" * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with clip_batches(clip_copy, "train", BATCH, tokenizer=caption_tokenizer, allow_corrupt=True) as s:
            with pytest.raises(RuntimeError, match="produced no usable samples"):
                next(s)


# ---------------------------------------------------------------------------------------- eval pass


def test_eval_batches_cover_each_sample_once(clip_root: Path, caption_tokenizer) -> None:
    seen = []
    for rank in range(3):
        passes = eval_batches(clip_root, "eval", 6, rank, 3, caption_tokenizer)
        batches = list(passes)
        assert len(batches) == len(passes) and ids_of(batches) == ids_of(list(passes))  # re-iterable
        seen.append(ids_of(batches))
    assert [i for ids in seen for i in ids] == list(range(40))
    assert [len(ids) for ids in seen] == [13, 13, 14]


# ------------------------------------------------------------------------------------- demo dataset


def test_demo_clip_is_deterministic(tmp_path: Path) -> None:
    def build(name: str, seed: int) -> dict[str, bytes]:
        root = make_demo_clip_dataset(
            tmp_path / name, num_train=48, num_eval=16, image_size=16, samples_per_shard=16, seed=seed
        )
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first, again, other = build("a", 1), build("b", 1), build("c", 2)
    assert first == again
    assert first["train/train-000000.tar"] != other["train/train-000000.tar"]
    with pytest.raises(FileExistsError, match=str(tmp_path / "a")):
        make_demo_clip_dataset(tmp_path / "a", num_train=48, num_eval=16, image_size=16, samples_per_shard=16)


def test_demo_captions_match_labels_and_tokenizer_knows_words(clip_root: Path, caption_tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    manifest = read_manifest(clip_root / "eval")
    assert manifest.metadata["class_names"] == list(CLASS_NAMES)
    assert manifest.metadata["prompt_templates"] == list(PROMPT_TEMPLATES)
    captions, labels = [], []
    for shard in manifest.shards:
        with tarfile.open(shard.path) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read().decode("utf-8", "replace")
                if member.name.endswith(".txt"):
                    captions.append(data)
                elif member.name.endswith(".cls"):
                    labels.append(int(data))
    assert len(captions) == len(labels) == 40
    for caption, label in zip(captions, labels):
        color, shape = CLASS_NAMES[label].split()
        assert color in caption and shape in caption
    train_templates = set(read_manifest(clip_root / "train").metadata["caption_templates"])
    assert not train_templates & set(manifest.metadata["caption_templates"])  # held-out wording

    raw = PreTrainedTokenizerFast(tokenizer_file=str(clip_root / "tokenizer.json"))
    prompts = [t.format(name) for t in PROMPT_TEMPLATES for name in CLASS_NAMES]
    unk = raw.convert_tokens_to_ids("[UNK]")
    for text in captions + prompts:
        assert unk not in raw(text)["input_ids"]
        assert caption_tokenizer.unk_token_id not in caption_tokenizer(text)["input_ids"]
    assert (caption_tokenizer.pad_token_id, caption_tokenizer.eos_token_id) == (0, 3)


def _split_samples(split_dir: Path) -> list[dict[str, str]]:
    samples: dict[str, dict[str, str]] = {}
    for shard in read_manifest(split_dir).shards:
        with tarfile.open(shard.path) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                if field != "png":
                    samples.setdefault(key, {})[field] = tar.extractfile(member).read().decode("utf-8")
    return [samples[k] for k in sorted(samples)]


def test_long_tailed_demo_records_frequency_noise_and_a_balanced_eval(tmp_path: Path, capsys) -> None:
    from dist_tempnet.commands import cli
    from dist_tempnet.data.demo_clip import COLOR_NAMES, SHAPES, class_shares

    out = tmp_path / "lt"
    argv = [
        "make-shards",
        "--out",
        str(out),
        "--num-train",
        "720",
        "--num-eval",
        "72",
        "--image-size",
        "8",
        "--class-zipf",
        "1.0",
        "--caption-noise",
        "0.2",
        "--generic-captions",
        "0.3",
        "--seed",
        "3",
    ]
    assert cli.main(argv) == 0
    train_meta = read_manifest(out / "train").metadata
    counts, freq = train_meta["class_counts"], train_meta["class_frequency"]
    # Zipf quotas over a seeded class ranking: the head class ~ 720 / H_36 = 172.5 samples, the tail ~ 4.8.
    expected = class_shares(1.0, 3) * 720
    assert sum(counts) == 720 and np.all(np.abs(np.asarray(counts) - expected) < 1)
    assert max(counts) in (172, 173) and min(counts) in (4, 5)
    assert read_manifest(out / "eval").metadata["class_frequency"] == freq  # the eval split knows it too

    train = _split_samples(out / "train")
    kinds = [s["caption_kind"] for s in train]
    assert 0.15 < kinds.count("wrong") / 720 < 0.25 and 0.25 < kinds.count("generic") / 720 < 0.35
    for sample in train:
        label = int(sample["cls"])
        assert float(sample["freq"]) == pytest.approx(freq[label], rel=1e-5)
        color, shape = CLASS_NAMES[label].split()
        named = [w for w in sample["txt"].replace(",", " ").split() if w in COLOR_NAMES or w in SHAPES]
        if sample["caption_kind"] == "exact":
            assert color in named and shape in named
        elif sample["caption_kind"] == "generic":  # one attribute, and that one right
            assert len(named) == 1 and named[0] in (color, shape)
        else:  # another class, described as precisely
            assert len(named) == 2 and set(named) != {color, shape}
    eval_labels = [int(s["cls"]) for s in _split_samples(out / "eval")]
    assert np.bincount(eval_labels, minlength=36).tolist() == [2] * 36
    assert {s["caption_kind"] for s in _split_samples(out / "eval")} == {"exact"}
    tokenizer = load_text_tokenizer(out / "tokenizer.json")
    for sample in train:
        assert tokenizer.unk_token_id not in tokenizer(sample["txt"])["input_ids"]

    # A bad share is one line naming the options, exit 2 (make-shards never shows a traceback).
    assert cli.main([*argv[:-4], "--caption-noise", "0.8", "--generic-captions", "0.3", "--overwrite"]) == 2
    assert "caption_noise + generic_captions" in capsys.readouterr().err


def test_existing_demo_data_must_match_the_long_tail_asked_for(tmp_path: Path) -> None:
    from dist_tempnet.config import ConfigError, load_config
    from dist_tempnet.data.prepare import prepare_data

    path = tmp_path / "demo"
    make_demo_clip_dataset(path, num_train=36, num_eval=36, image_size=8, class_zipf=1.0)
    prepare_data(load_config(None, [f"data.path={path}", "data.demo_class_zipf=1.0"]))  # same: reused
    with pytest.raises(ConfigError, match="data.path: .*class_zipf=1.0.*class_zipf=0.0"):
        prepare_data(load_config(None, [f"data.path={path}"]))


# ------------------------------------------------------------------------------------- token shards


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [f"the quick brown fox {i} jumps over the lazy dog number {i}." for i in range(200)]
    return save_hf_tokenizer_dir(
        train_byte_level_bpe(texts, 300),
        tmp_path_factory.mktemp("tok") / "bpe",
        bos_token=BPE_EOS,
        eos_token=BPE_EOS,
        pad_token=BPE_PAD,
    )


def _write_docs(folder: Path) -> dict[str, str]:
    """Six .txt documents and four in a .jsonl file; names as the manifest records them."""
    folder.mkdir()
    docs = {}
    for i in range(6):
        path = folder / f"doc{i}.txt"
        docs[str(path)] = f"Text file document {i}: " + " ".join(f"word{i}x{j}" for j in range(60))
        path.write_text(docs[str(path)])
    lines = []
    for i in range(4):
        text = f"JSON lines document {i}: " + " ".join(f"token{i}y{j}" for j in range(60))
        docs[f"{folder / 'more.jsonl'}:{i + 1}"] = text
        lines.append(json.dumps({"text": text}))
    (folder / "more.jsonl").write_text("\n".join(lines) + "\n")
    return docs


def test_token_shards_round_trip_and_heldout_by_document(tmp_path: Path, bpe_dir: Path) -> None:
    docs = _write_docs(tmp_path / "docs")
    files = sorted((tmp_path / "docs").glob("*.txt")) + [tmp_path / "docs" / "more.jsonl"]
    out = make_token_shards(
        files, bpe_dir, tmp_path / "tokens", seq_len=16, samples_per_shard=8, heldout_fraction=0.3, seed=0
    )
    train, held = read_manifest(out / "train"), read_manifest(out / "eval")
    train_docs, held_docs = train.metadata["documents"], held.metadata["documents"]
    assert len(held_docs) == 3 and not set(train_docs) & set(held_docs)
    assert set(train_docs) | set(held_docs) == set(docs)
    assert train.seq_len == 16 and train.tokenizer_path == bpe_dir.resolve()

    tokenizer = load_text_tokenizer(train.tokenizer_path)
    for manifest, names in ((train, train_docs), (held, held_docs)):
        windows = torch.cat([b["input_ids"] for b in eval_batches(manifest, None, batch_size=5)])
        assert windows.shape[1] == 17 and windows.dtype == torch.long
        assert torch.equal(windows[:-1, -1], windows[1:, 0])  # stride seq_len: one shared token
        stream = torch.cat([windows[0], windows[1:, 1:].reshape(-1)]).tolist()
        expected = BPE_EOS.join(docs[name] for name in names) + BPE_EOS
        assert expected.startswith(tokenizer.decode(stream))  # lossless; only the tail window is dropped
        assert len(tokenizer.decode(stream)) > len(expected) - 200

    # Endless training stream over token shards, split across two ranks (uneven last shard).
    seen = []
    for rank in range(2):
        with token_batches(out, "train", 1, rank, 2, seed=1) as stream:
            epoch0 = sum(s.num_samples for s in stream.dataset.shards_for(0, 0, 1))
            seen += ids_of(take(stream, epoch0))
            assert stream.epoch == 0 and next(stream)["input_ids"].shape == (1, 17) and stream.epoch == 1
    assert sorted(seen) == list(range(train.num_samples))


@pytest.mark.parametrize("num_files", [1, 2])
def test_few_text_files_hold_out_the_asked_share_of_tokens(tmp_path: Path, bpe_dir: Path, num_files) -> None:
    """One or two .txt files with the default 5 %: not a whole file (50 % or an error), the last
    5 % of each file's tokens, and the manifests say so."""
    files = []
    for i in range(num_files):
        files.append(tmp_path / f"book{i}.txt")
        files[-1].write_text(" ".join(f"w{i}x{j % 97}" for j in range(1500)))
    out = make_token_shards(files, bpe_dir, tmp_path / "tokens", seq_len=16, heldout_fraction=0.05, seed=0)
    train, held = read_manifest(out / "train"), read_manifest(out / "eval")
    assert train.metadata["heldout_by"] == held.metadata["heldout_by"] == "document_tail"
    share = held.metadata["num_tokens"] / (held.metadata["num_tokens"] + train.metadata["num_tokens"])
    assert 0.045 < share < 0.055, share
    tokenizer = load_text_tokenizer(train.tokenizer_path)
    windows = torch.cat([b["input_ids"] for b in eval_batches(held, None, batch_size=8)])
    # The held-out text is from the end of the last file: what train never sees.
    assert f"w{num_files - 1}x" in tokenizer.decode(windows[-1])


def test_tokenizer_dir_loads_with_transformers(bpe_dir: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    auto = AutoTokenizer.from_pretrained(str(bpe_dir), local_files_only=True)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"))
    text = "the lazy dog jumps"
    assert auto(text)["input_ids"] == fast(text)["input_ids"] and auto.decode(auto(text)["input_ids"]) == text
    assert auto.eos_token == BPE_EOS and auto.pad_token == BPE_PAD


def test_make_demo_text_dataset(tmp_path: Path) -> None:
    out = make_demo_text_dataset(
        tmp_path / "text", vocab_size=512, seq_len=64, seed=0, include_docstrings=False
    )
    train, held = read_manifest(out / "train"), read_manifest(out / "eval")
    assert not set(train.metadata["documents"]) & set(held.metadata["documents"])
    assert held.num_samples > 0 and train.num_samples > 10 * held.num_samples
    tokenizer = load_text_tokenizer(out / "tokenizer")
    assert len(tokenizer) == 512 == train.metadata["vocab_size"]
    batch = next(iter(eval_batches(out, "eval", 4)))
    assert batch["input_ids"].shape == (4, 65) and int(batch["input_ids"].max()) < 512
    with pytest.raises(FileExistsError, match=str(tmp_path / "text")):
        make_demo_text_dataset(tmp_path / "text", vocab_size=512, seq_len=64, include_docstrings=False)


def test_truncated_shard_counts_lost_samples_and_shards(clip_copy: Path, caption_tokenizer) -> None:
    """A truncated shard loses its whole unread tail: counted as samples, not as one 'skip'."""
    shard = _shard(clip_copy, 2)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    with pytest.warns(RuntimeWarning, match=str(shard)):
        stream = clip_batches(
            clip_copy, "train", BATCH, tokenizer=caption_tokenizer, allow_corrupt=True, shuffle_buffer=0
        )
        with stream:
            ids = ids_of(take(stream, 20))  # 160 samples: all of epoch 0 (fewer than 128 are readable)
    readable = len({i for i in ids if 32 <= i < 48})
    assert 0 < readable < SHARD_SIZE
    assert stream.skipped_shards >= 1
    assert stream.skipped_samples == stream.skipped_shards * (SHARD_SIZE - readable)
