"""A procedurally generated captioned-image dataset with structure a tiny CLIP can learn.

Each image shows one shape (6 kinds) in one color (6) -- 36 classes named like "red circle" -- at
one of 9 positions (3x3 grid), small or large, on a tinted noisy background. Captions describe
color, shape, and usually size and position, in varied wording.

Held out for evaluation: the ``eval`` split has fresh images whose captions use templates never
seen in training (retrieval), and its manifest carries class names plus zero-shot prompt templates
that are not training templates either. Everything is a deterministic function of the seed.

Long-tailed variant (:class:`LongTail`, all zero by default = the balanced demo): class frequencies
follow a Zipf law over a seeded ranking of the 36 classes, a share of training captions describes a
wrong class (noise) and a share names only a vaguer concept ("a red object", "a picture of a
circle"); the eval split is then exactly balanced over classes and its captions stay clean, so
accuracy on the rarest classes can be read off it. Every sample records its class's share of the
training split (field ``freq``) and what its caption describes (field ``caption_kind``:
``exact`` | ``wrong`` | ``generic``); both manifests carry ``class_frequency`` / ``class_counts``.

Layout written by :func:`make_demo_clip_dataset`::

    out_dir/tokenizer.json         word-level caption tokenizer (load_text_tokenizer)
    out_dir/train/ , out_dir/eval/ shards + dataset.json
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from dist_tempnet.data.atomic import publish, tmp_path_for
from dist_tempnet.data.manifest import MANIFEST_NAME
from dist_tempnet.data.shards import write_image_text_shards
from dist_tempnet.data.text_tokenizer import build_word_level_tokenizer, template_words

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLORS = {  # RGB in [0, 1]; hues far apart so that noise and tint never make two colors alike
    "red": (0.86, 0.14, 0.14),
    "green": (0.16, 0.66, 0.22),
    "blue": (0.14, 0.30, 0.88),
    "yellow": (0.93, 0.85, 0.15),
    "purple": (0.56, 0.22, 0.78),
    "orange": (0.96, 0.54, 0.08),
}
COLOR_NAMES = tuple(COLORS)
CLASS_NAMES = tuple(f"{color} {shape}" for shape in SHAPES for color in COLOR_NAMES)

# 3x3 grid, row-major from the top left; each position has several phrasings.
POSITION_PHRASES = (
    ("in the top left", "in the upper left corner"),
    ("at the top", "near the top edge"),
    ("in the top right", "in the upper right corner"),
    ("on the left", "at the left side"),
    ("in the center", "in the middle"),
    ("on the right", "at the right side"),
    ("in the bottom left", "in the lower left corner"),
    ("at the bottom", "near the bottom edge"),
    ("in the bottom right", "in the lower right corner"),
)
SIZE_WORDS = (("small", "tiny", "little"), ("large", "big"))
SIZE_RADIUS = ((0.12, 0.16), (0.20, 0.26))  # radius range as a fraction of the image side
GRID_CENTERS = (0.23, 0.5, 0.77)

TRAIN_TEMPLATES = (
    "a {color} {shape} {where}",
    "a photo of a {size} {color} {shape}",
    "a {size} {color} {shape} {where}",
    "there is a {color} {shape} {where}",
    "{where} there is a {size} {color} {shape}",
    "a picture of a {color} {shape}",
    "a {size} {shape} colored {color}, {where}",
    "an image with a {size} {color} {shape} {where}",
    "the {shape} is {color} and {size}",
    "{color} {shape}, {size}, {where}",
    "a {color} {shape} on a plain background",
    "a photo of a {color} {shape} {where}",
)
EVAL_TEMPLATES = (  # held out: retrieval captions of the eval split
    "one {size} {color} {shape} {where}",
    "a drawing of a {color} {shape} {where}",
    "we see a {size} {color} {shape} {where}",
    "a {color} {shape} that is {size}, placed {where}",
)
GENERIC_TEMPLATES = (  # a vaguer concept than the class: color only or shape only
    "a {color} object {where}",
    "a photo of something {color}",
    "a {size} {color} thing",
    "a {size} {shape} {where}",
    "a picture of a {shape}",
    "there is a {shape} {where}",
)
PROMPT_TEMPLATES = (  # held out: zero-shot classification prompts, filled with a class name
    "a photo of a {}.",
    "a {}.",
    "a drawing of the {}.",
    "a rendering of a {}.",
)

TOKENIZER_NAME = "tokenizer.json"
NOISE_STD = 0.04
SCENE_CHUNK = 256  # scenes sampled per seeded generator
DRAW_PIXELS = 1 << 22  # pixels rendered per vectorized call
_A_BEFORE_VOWEL = re.compile(r"\b([aA]) ([aeiou])")
_SPLIT_STREAMS = {"train": 1, "eval": 2}  # independent random streams per split
CAPTION_KINDS = ("exact", "wrong", "generic")


@dataclass(frozen=True)
class LongTail:
    """How the training split departs from the balanced demo; all zero means no departure.

    class_zipf: class k of a seeded ranking gets a share ∝ (k + 1)^-class_zipf of the training split
        (exact quotas, shuffled); > 0 also makes the eval split exactly balanced over classes.
    caption_noise: share of training captions that describe another (random) class.
    generic_captions: share of training captions that name only the color or only the shape.
    """

    class_zipf: float = 0.0
    caption_noise: float = 0.0
    generic_captions: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.class_zipf) and self.class_zipf >= 0):
            raise ValueError(f"class_zipf must be a finite number >= 0, got {self.class_zipf}")
        for name in ("caption_noise", "generic_captions"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.caption_noise + self.generic_captions > 1:
            raise ValueError(
                f"caption_noise + generic_captions must be <= 1, got {self.caption_noise} + "
                f"{self.generic_captions}"
            )

    @property
    def active(self) -> bool:
        return bool(self.class_zipf or self.caption_noise or self.generic_captions)


def class_shares(class_zipf: float, seed: int) -> np.ndarray:
    """Target share of each class (index into CLASS_NAMES) in the training split."""
    num = len(CLASS_NAMES)
    if class_zipf == 0:
        return np.full(num, 1.0 / num)
    rank = np.random.default_rng([seed, 3]).permutation(num)  # rank[k] = class at rank k
    shares = np.empty(num)
    shares[rank] = np.arange(1, num + 1, dtype=np.float64) ** -class_zipf
    return shares / shares.sum()


def quota_labels(shares: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n labels whose class counts are the shares' largest-remainder rounding, in random order."""
    raw = shares * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))


@dataclass(frozen=True)
class SceneBatch:
    """Attributes of n generated scenes (arrays of length n)."""

    shape: np.ndarray  # index into SHAPES
    color: np.ndarray  # index into COLOR_NAMES
    position: np.ndarray  # index into POSITION_PHRASES
    size: np.ndarray  # 0 small, 1 large
    center: np.ndarray  # [n, 2] (x, y) in [0, 1]
    radius: np.ndarray  # fraction of the side
    fg: np.ndarray  # [n, 3] shape color after jitter
    bg: np.ndarray  # [n, 3] background tint

    @property
    def label(self) -> np.ndarray:
        return self.shape * len(COLOR_NAMES) + self.color

    def __len__(self) -> int:
        return len(self.shape)

    def slice(self, start: int, stop: int) -> SceneBatch:
        return SceneBatch(*(getattr(self, f.name)[start:stop] for f in fields(self)))


def sample_scenes(rng: np.random.Generator, n: int, labels: np.ndarray | None = None) -> SceneBatch:
    """n random scenes; `labels` (class indices), when given, fix their shape and color."""
    shape = rng.integers(len(SHAPES), size=n)
    color = rng.integers(len(COLOR_NAMES), size=n)
    if labels is not None:  # drawn above all the same, so every other attribute keeps its random stream
        shape, color = np.divmod(np.asarray(labels, dtype=np.int64), len(COLOR_NAMES))
    position = rng.integers(len(POSITION_PHRASES), size=n)
    size = rng.integers(2, size=n)
    grid = np.asarray(GRID_CENTERS)
    center = np.stack([grid[position % 3], grid[position // 3]], axis=1) + rng.uniform(-0.05, 0.05, (n, 2))
    low, high = np.asarray(SIZE_RADIUS).T
    radius = rng.uniform(low[size], high[size])
    palette = np.asarray([COLORS[c] for c in COLOR_NAMES])
    fg = np.clip(palette[color] + rng.uniform(-0.06, 0.06, (n, 3)), 0, 1)
    gray = rng.uniform(0.15, 0.85, (n, 1))
    bg = np.clip(gray + rng.uniform(-0.08, 0.08, (n, 3)), 0, 1)
    return SceneBatch(shape, color, position, size, center, radius, fg, bg)


def _shape_mask(name: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean mask of one shape kind; dx, dy are offsets from the centers and r radii (side units)."""
    ax, ay = np.abs(dx), np.abs(dy)
    dist2 = dx * dx + dy * dy
    if name == "circle":
        return dist2 <= r * r
    if name == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if name == "triangle":  # apex up
        return (dy <= 0.8 * r) & (ax <= 0.6 * (dy + r))
    if name == "cross":
        arm = 0.3 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if name == "diamond":
        return ax + ay <= r
    if name == "ring":
        return (dist2 <= r * r) & (dist2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {name!r}")


def _shape_masks(shape: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean [n, H, W] masks, each shape kind evaluated only on the scenes that show it."""
    masks = np.zeros((dx.shape[0], dy.shape[1], dx.shape[2]), dtype=bool)
    for index, name in enumerate(SHAPES):
        chosen = shape == index
        if chosen.any():
            masks[chosen] = _shape_mask(name, dx[chosen], dy[chosen], r[chosen])
    return masks


def draw_scenes(scenes: SceneBatch, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Render scenes to uint8 [n, H, W, 3] (vectorized over the whole batch)."""
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    dx = coords[None, None, :] - scenes.center[:, 0, None, None].astype(np.float32)
    dy = coords[None, :, None] - scenes.center[:, 1, None, None].astype(np.float32)
    r = scenes.radius[:, None, None].astype(np.float32)
    masks = _shape_masks(scenes.shape, dx, dy, r)[..., None]
    fg = scenes.fg[:, None, None, :].astype(np.float32)
    bg = scenes.bg[:, None, None, :].astype(np.float32)
    image = np.where(masks, fg, bg)
    image += NOISE_STD * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def fix_articles(caption: str) -> str:
    """'a orange ring' -> 'an orange ring' (templates cannot know which word follows the article)."""
    return _A_BEFORE_VOWEL.sub(r"\1n \2", caption)


def _fill(template: str, shape: int, color: int, size: int, position: int, pick: int) -> str:
    phrases = POSITION_PHRASES[position]
    size_words = SIZE_WORDS[size]
    return fix_articles(
        template.format(
            color=COLOR_NAMES[color],
            shape=SHAPES[shape],
            size=size_words[(pick >> 8) % len(size_words)],
            where=phrases[(pick & 0xFF) % len(phrases)],
        )
    )


def write_captions(scenes: SceneBatch, templates: tuple[str, ...], rng: np.random.Generator) -> list[str]:
    n = len(scenes.shape)
    template_idx = rng.integers(len(templates), size=n)
    phrase_pick = rng.integers(1 << 16, size=n)
    size_pick = rng.integers(1 << 16, size=n)
    captions = []
    for i in range(n):
        phrases = POSITION_PHRASES[scenes.position[i]]
        size_words = SIZE_WORDS[scenes.size[i]]
        captions.append(
            fix_articles(
                templates[template_idx[i]].format(
                    color=COLOR_NAMES[scenes.color[i]],
                    shape=SHAPES[scenes.shape[i]],
                    size=size_words[size_pick[i] % len(size_words)],
                    where=phrases[phrase_pick[i] % len(phrases)],
                )
            )
        )
    return captions


def degrade_captions(
    scenes: SceneBatch, captions: list[str], long_tail: LongTail, rng: np.random.Generator
) -> list[str]:
    """Caption kinds (see CAPTION_KINDS) and the captions after noise: `captions` is changed in place."""
    n = len(scenes)
    draw = rng.random(n)
    kinds = np.where(draw < long_tail.caption_noise, 1, 0)
    kinds[
        (draw >= long_tail.caption_noise) & (draw < long_tail.caption_noise + long_tail.generic_captions)
    ] = 2
    other = (scenes.label + rng.integers(1, len(CLASS_NAMES), size=n)) % len(CLASS_NAMES)
    template = rng.integers(1 << 16, size=n)
    pick = rng.integers(1 << 16, size=n)
    for i in np.flatnonzero(kinds):
        if kinds[i] == 1:  # a wrong class, described as precisely as a correct caption would be
            shape, color = divmod(int(other[i]), len(COLOR_NAMES))
            chosen = TRAIN_TEMPLATES[template[i] % len(TRAIN_TEMPLATES)]
        else:
            shape, color = int(scenes.shape[i]), int(scenes.color[i])
            chosen = GENERIC_TEMPLATES[template[i] % len(GENERIC_TEMPLATES)]
        captions[i] = _fill(chosen, shape, color, int(scenes.size[i]), int(scenes.position[i]), int(pick[i]))
    return [CAPTION_KINDS[k] for k in kinds]


def _planned_labels(num_samples: int, split: str, seed: int, long_tail: LongTail) -> np.ndarray | None:
    """Exact class quotas (Zipf for train, balanced for eval) when the data is long-tailed, else None."""
    if not long_tail.class_zipf:
        return None
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], 4])
    shares = class_shares(long_tail.class_zipf if split == "train" else 0.0, seed)
    return quota_labels(shares, num_samples, rng)


def split_labels(num_samples: int, split: str, seed: int, long_tail: LongTail = LongTail()) -> np.ndarray:
    """The class label of every sample of a split, in id order, without drawing any image."""
    planned = _planned_labels(num_samples, split, seed, long_tail)
    if planned is not None:
        return planned
    stream = _SPLIT_STREAMS[split]
    chunks = range(0, num_samples, SCENE_CHUNK)
    return np.concatenate(
        [
            sample_scenes(
                np.random.default_rng([seed, stream, chunk, 0]), min(SCENE_CHUNK, num_samples - start)
            ).label
            for chunk, start in enumerate(chunks)
        ]
    )


def generate_split(
    num_samples: int,
    image_size: int,
    split: str,
    seed: int,
    long_tail: LongTail = LongTail(),
    class_frequency: np.ndarray | None = None,
) -> Iterator[dict]:
    """Yield samples of one split, deterministically: dicts with image (uint8 [H, W, 3]), caption,
    label, and (when `class_frequency` is given) freq = that share for the sample's class, and
    caption_kind. Noise and generic captions only touch the train split."""
    templates = TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES
    stream = _SPLIT_STREAMS[split]
    planned = _planned_labels(num_samples, split, seed, long_tail)
    # Draw in sub-batches of ~DRAW_PIXELS pixels: bounded memory at 224x224 and above.
    draw_batch = max(1, DRAW_PIXELS // (image_size * image_size))
    for chunk, start in enumerate(range(0, num_samples, SCENE_CHUNK)):
        # Generators per fixed-size chunk: scenes and captions do not depend on the image size, and
        # sample i does not depend on how the caller consumes the stream.
        scene_rng = np.random.default_rng([seed, stream, chunk, 0])
        noise_rng = np.random.default_rng([seed, stream, chunk, 1])
        count = min(SCENE_CHUNK, num_samples - start)
        labels = None if planned is None else planned[start : start + count]
        scenes = sample_scenes(scene_rng, count, labels)
        captions = write_captions(scenes, templates, scene_rng)
        kinds = [CAPTION_KINDS[0]] * count
        if split == "train" and (long_tail.caption_noise or long_tail.generic_captions):
            kinds = degrade_captions(
                scenes, captions, long_tail, np.random.default_rng([seed, stream, chunk, 2])
            )
        labels = scenes.label
        for low in range(0, len(scenes), draw_batch):
            images = draw_scenes(scenes.slice(low, low + draw_batch), image_size, noise_rng)
            for i, image in enumerate(images, low):
                sample = {"image": image, "caption": captions[i], "label": int(labels[i])}
                if class_frequency is not None:
                    sample["freq"] = f"{class_frequency[labels[i]]:.6g}"
                    sample["caption_kind"] = kinds[i]
                yield sample


def caption_vocabulary_texts() -> list[str]:
    """Every literal word any caption or prompt can contain (tokenizer training text)."""
    templates = TRAIN_TEMPLATES + EVAL_TEMPLATES + GENERIC_TEMPLATES + PROMPT_TEMPLATES
    words = [template_words(t) for t in templates]
    words += [*SHAPES, *COLOR_NAMES, *CLASS_NAMES]
    words += [p for phrases in POSITION_PHRASES for p in phrases]
    words += [w for group in SIZE_WORDS for w in group]
    return words


def _split_metadata(split: str, image_size: int, seed: int, long_tail: LongTail, counts: np.ndarray) -> dict:
    return {
        "image_size": image_size,
        "tokenizer": f"../{TOKENIZER_NAME}",
        "class_names": list(CLASS_NAMES),
        "prompt_templates": list(PROMPT_TEMPLATES),
        "caption_templates": list(TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES),
        "generator": "dist_tempnet.data.demo_clip",
        "seed": seed,
        # Per class (CLASS_NAMES order), of the TRAIN split in both manifests: what τ is related to.
        "class_counts": [int(c) for c in counts],
        "class_frequency": [round(float(c) / max(1, counts.sum()), 8) for c in counts],
        "long_tail": asdict(long_tail),
    }


def check_long_tail(split_dir: str | Path, long_tail: LongTail) -> None:
    """Raise ValueError when a demo split on disk was built with other long-tail settings."""
    from dist_tempnet.data.manifest import read_manifest

    meta = read_manifest(split_dir).metadata
    if meta.get("generator") != "dist_tempnet.data.demo_clip":
        return
    built = LongTail(**meta.get("long_tail", {}))
    if built != long_tail:
        raise ValueError(
            f"{split_dir} holds demo data built with {built}, but {long_tail} was asked for: "
            "point data.path at another directory (or delete this one)"
        )


def make_demo_clip_dataset(
    out_dir: str | Path,
    num_train: int = 4096,
    num_eval: int = 512,
    image_size: int = 32,
    samples_per_shard: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    *,
    class_zipf: float = 0.0,
    caption_noise: float = 0.0,
    generic_captions: float = 0.0,
) -> Path:
    """Generate the demo dataset (train + eval splits, tokenizer) under ``out_dir``; returns out_dir.

    `class_zipf`, `caption_noise`, `generic_captions`: the long-tailed variant (see :class:`LongTail`).
    """
    out_dir = Path(out_dir)
    long_tail = LongTail(class_zipf, caption_noise, generic_captions)
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 to draw recognisable shapes, got {image_size}")
    splits = {"train": num_train, "eval": num_eval}
    for split, count in splits.items():
        if count < 1:
            raise ValueError(f"num_{split} must be >= 1, got {count}")
        # Check every split before writing any, so a refusal leaves nothing half-replaced.
        if (out_dir / split / MANIFEST_NAME).exists() and not overwrite:
            raise FileExistsError(
                f"{out_dir / split} already holds a complete dataset split; pass overwrite=True to replace it"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / TOKENIZER_NAME
    tmp = tmp_path_for(tokenizer_path)
    build_word_level_tokenizer(caption_vocabulary_texts()).save(str(tmp))
    publish(tmp, tokenizer_path)
    counts = np.bincount(split_labels(num_train, "train", seed, long_tail), minlength=len(CLASS_NAMES))
    frequency = counts / num_train
    for split, count in splits.items():
        write_image_text_shards(
            generate_split(count, image_size, split, seed, long_tail, frequency),
            out_dir,
            split,
            samples_per_shard,
            metadata=_split_metadata(split, image_size, seed, long_tail, counts),
            overwrite=overwrite,
            total=count,
        )
    return out_dir
