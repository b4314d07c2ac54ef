"""Standard CLIP evaluation: multi-caption retrieval recall, ImageFolder zero-shot, built-in lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dist_tempnet.config import EvalConfig
from dist_tempnet.data.eval_sets import imagenet_classnames, load_templates, openai_imagenet_templates
from dist_tempnet.metrics import multi_caption_retrieval, retrieval_metrics
from dist_tempnet.tasks.clip_benchmarks import BenchmarkContext, run_benchmarks


def test_multi_caption_perfect_embeddings_give_one() -> None:
    images = torch.eye(4)
    texts = torch.eye(4).repeat_interleave(5, dim=0)  # 5 captions per image, each = its image
    text_image = torch.arange(4).repeat_interleave(5)
    out = multi_caption_retrieval(images, texts, text_image, chunk_size=3)
    assert all(v == 1.0 for v in out.values()), out
    # The old metric assumed caption i belongs to image i: with 5 captions that is simply wrong.
    assert retrieval_metrics(torch.eye(4), torch.eye(4))["t2i_recall_at_1"] == 1.0


def test_multi_caption_known_ranks() -> None:
    # 3 images (one-hot); captions: image 0 has 2 captions, image 1 has 1, image 2 has 2.
    images = torch.eye(3)
    texts = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # cap0 -> img0, exact: rank 0
            [0.0, 0.9, 0.1],  # cap1 -> img0, but img1 best, img2 next, img0 last: rank 2
            [0.0, 0.2, 1.0],  # cap2 -> img1: img2 best, img1 second: rank 1
            [0.0, 0.1, 1.0],  # cap3 -> img2: rank 0
            [1.0, 0.5, 0.0],  # cap4 -> img2: img0, img1 above, img2 last: rank 2
        ]
    )
    text_image = torch.tensor([0, 0, 1, 2, 2])
    out = multi_caption_retrieval(images, texts, text_image, ks=(1, 2, 3), chunk_size=2)
    assert out["t2i_recall_at_1"] == pytest.approx(2 / 5)
    assert out["t2i_recall_at_2"] == pytest.approx(3 / 5)
    assert out["t2i_recall_at_3"] == pytest.approx(1.0)
    # i2t, after normalization: img0's best own caption is cap0 (1.0) but cap4 (0.894) is below it: rank 0.
    # img1: own cap2 scores 0.196; cap1 (0.994), cap4 (0.447), cap3 (0.0995 < 0.196): rank 2.
    # img2: own cap3 (0.995) beats everything: rank 0.
    assert out["i2t_recall_at_1"] == pytest.approx(2 / 3)
    assert out["i2t_recall_at_2"] == pytest.approx(2 / 3)
    assert out["i2t_recall_at_3"] == pytest.approx(1.0)


def test_builtin_imagenet_lists() -> None:
    names = imagenet_classnames()
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    templates = openai_imagenet_templates()
    assert len(templates) == 80 and all("{}" in t for t in templates)
    assert load_templates("openai") == templates and load_templates("simple") == ["a photo of a {}."]


COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _color_encoders(device: torch.device):
    """Hand-made 'CLIP': an image embeds as its mean colour, a prompt as the colour it names."""

    def images(pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(pixels.float().mean(dim=(2, 3)), dim=-1)

    def texts(captions: list[str]) -> torch.Tensor:
        rows = [
            torch.tensor(next(v for k, v in COLORS.items() if k in c), dtype=torch.float) for c in captions
        ]
        return F.normalize(torch.stack(rows), dim=-1).to(device)

    return images, texts


def _tree(root: Path, per_class: int = 3) -> Path:
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((12 + i, 10, 3), rgb, np.uint8)).save(root / name / f"{i}.jpg")
    return root


def _ctx(**kw) -> BenchmarkContext:
    images, texts = _color_encoders(torch.device("cpu"))
    return BenchmarkContext(
        images, texts, image_size=8, batch_size=2, num_workers=0, device=torch.device("cpu"), **kw
    )


def test_image_folder_zero_shot(tmp_path: Path) -> None:
    root = _tree(tmp_path / "val")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {} thing.\nart of the {}.\n")
    out = run_benchmarks(_ctx(), EvalConfig(zero_shot_path=str(root), templates=str(templates)))
    assert out == {"eval/zeroshot/top1": 1.0, "eval/zeroshot/top5": 1.0, "eval/zeroshot/num_images": 9.0}
    # Class names in the wrong order (from a file): every image is misclassified.
    names = tmp_path / "names.txt"
    names.write_text("red\nblue\ngreen\n")  # directories sort as blue, green, red
    out = run_benchmarks(
        _ctx(), EvalConfig(zero_shot_path=str(root), classnames=str(names), templates="simple")
    )
    assert out["eval/zeroshot/top1"] == 0.0
    with pytest.raises(ValueError, match="1000 class names for 3 class directories"):
        run_benchmarks(_ctx(), EvalConfig(zero_shot_path=str(root), classnames="imagenet"))


def test_karpathy_json_retrieval(tmp_path: Path) -> None:
    images = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        Image.fromarray(np.full((10, 10, 3), rgb, np.uint8)).save(tmp_path / f"{i}.jpg")
        sentences = [{"raw": f"a {name} square"}, {"raw": f"something {name}"}]
        images.append({"filename": f"{i}.jpg", "split": "test", "sentences": sentences})
    images.append({"filename": "train.jpg", "split": "train", "sentences": [{"raw": "x"}]})  # not read
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    cfg = EvalConfig(retrieval_path=str(tmp_path / "dataset_flickr30k.json"))
    out = run_benchmarks(_ctx(), cfg)
    assert out["eval/retrieval/num_images"] == 3 and out["eval/retrieval/num_captions"] == 6
    assert out["eval/retrieval/t2i_recall_at_1"] == 1.0 and out["eval/retrieval/i2t_recall_at_1"] == 1.0
