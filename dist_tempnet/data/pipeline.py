"""Batch streams over the shards: infinite, reshuffled training streams and finite evaluation passes.

Training streams (:func:`clip_batches`, :func:`token_batches`) are step-based: every rank must be able
to produce a batch at every step (ranks run collectives each step), so they never end -- epoch after
epoch -- and always yield full batches. Per epoch ``e`` the shard list is shuffled with a generator
seeded from ``(seed, e)`` -- the same order on every rank -- then dealt out round-robin to ranks (the
``split_by_node`` rule, with rank/world_size given explicitly because we may not be under
torch.distributed yet) and then to DataLoader workers (the ``split_by_worker`` rule). Within a worker a
shuffle buffer mixes samples; it drains at the end of each epoch so every sample appears exactly once
per epoch on exactly one rank (when shards divide evenly).

Exact resume: a :class:`BatchStream` records, per epoch still in flight, which sample ids it has
delivered (a bitmap over the split's ids) and ``position_state()`` returns them for a checkpoint.
:func:`resume_position` turns the states of every rank of an earlier run (any world size, any number
of DataLoader workers) into a :class:`StreamResume`: the epoch to restart at and, per epoch, the ids
some rank already consumed. A resumed stream replays the deterministic epoch order and drops those ids
after the shuffle buffer but before decoding, so with the same world size it yields exactly the
batches an uninterrupted run would, and with another world size every sample of the interrupted epoch
is still seen exactly once.

Evaluation passes (:func:`eval_batches`) are finite, deterministic and unshuffled; ranks take balanced
contiguous ranges of sample ids, so every sample is seen exactly once overall.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_tempnet.data.augment import TrainCrop
from dist_tempnet.data.manifest import INDEX_VERSION, Manifest, ShardInfo, resolve_manifest
from dist_tempnet.data.reader import (
    ImageTextDecoder,
    ImageTextSample,
    SkipLog,
    TokenDecoder,
    TokenSample,
    check_shards_on_disk,
    iter_raw_samples,
)

# OpenAI CLIP's normalization constants (what pretrained CLIP image towers expect).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_TEXT_LEN = 32
DEFAULT_SHUFFLE_BUFFER = 1024

# Per-batch bookkeeping sent from a worker to the main process, stripped before the user sees it.
_META_EPOCH, _META_WORKER, _META_SKIPPED = "_epoch", "_worker", "_corrupt_skipped"
_META_SAMPLE_EPOCHS = "_sample_epochs"
POSITION_FORMAT = "dist_tempnet.data_position/v1"

ManifestLike = str | Path | Manifest


# ------------------------------------------------------------------------------------------ collation


def normalize_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> CLIP-normalized floats, on whatever device ``pixels`` is (the GPU in
    training: batches travel as uint8, a quarter of the bytes of float32)."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1).mul_(255.0)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1).mul_(255.0)
    return pixels.float().sub_(mean).div_(std).to(dtype)


def pin_memory_for(device: torch.device | str | None) -> bool:
    """Whether batches bound for `device` should come in pinned (page-locked) host memory: on CUDA the
    trainer's non_blocking copy from pinned memory runs asynchronously, overlapping the step; from
    pageable memory it is a synchronous staging copy. Elsewhere pinning only costs."""
    return device is not None and torch.device(device).type == "cuda"


@dataclass(frozen=True)
class ImageTextCollator:
    """ImageTextSamples -> pixel_values (uint8 [B, 3, H, W]; see normalize_pixels), tokenized
    captions, sample ids, labels."""

    tokenizer: Any
    max_text_len: int

    def __call__(self, samples: Sequence[ImageTextSample]) -> dict[str, Any]:
        pixels = torch.from_numpy(np.stack([s.pixels for s in samples]))  # uint8 [B, H, W, 3]
        # Fixed-length padding: every step sees the same shapes (no recompiles, no ragged collectives).
        text = self.tokenizer(
            [s.caption for s in samples],
            padding="max_length",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        return {
            "pixel_values": pixels.permute(0, 3, 1, 2).contiguous(),
            "input_ids": text["input_ids"].long(),
            "attention_mask": text["attention_mask"].long(),
            "sample_ids": torch.tensor([s.sample_id for s in samples], dtype=torch.long),
            "labels": torch.tensor([s.label for s in samples], dtype=torch.long),
        }


def collate_tokens(samples: Sequence[TokenSample]) -> dict[str, Any]:
    batch = {
        "input_ids": torch.from_numpy(np.stack([s.tokens for s in samples])),
        "sample_ids": torch.tensor([s.sample_id for s in samples], dtype=torch.long),
    }
    if any(s.loss_mask is not None for s in samples):
        # Chat shards: the LM task keeps only masked-in (assistant) tokens as targets.
        ones = np.ones_like(samples[0].tokens, dtype=bool)
        batch["loss_mask"] = torch.from_numpy(
            np.stack([s.loss_mask if s.loss_mask is not None else ones for s in samples])
        )
    return batch


# --------------------------------------------------------------------------------- shard assignment


def epoch_shard_order(shards: Sequence[ShardInfo], epoch: int, seed: int, shuffle: bool) -> list[ShardInfo]:
    """All shards in this epoch's order -- identical on every rank, since all ranks share the seed."""
    order = list(shards)
    if shuffle:
        random.Random(f"dist_tempnet/shards/{seed}/{epoch}").shuffle(order)
    return order


def split_round_robin(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """Every ``count``-th item starting at ``index`` (how shards are dealt to ranks, then workers)."""
    return list(items[index::count])


def shuffled_through_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle through a buffer of ``size`` items, drained (fully shuffled) at the end."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def _worker_position(offset: int = 0) -> tuple[int, int]:
    """(logical worker, number of workers). DataLoader always delivers physical worker 0's batch
    first; a resumed stream shifts the logical numbering by ``offset`` so that the worker whose turn
    was next when the checkpoint was taken delivers first again."""
    # Read torch's worker info directly (webdataset's helper also honours WORKER/NUM_WORKERS env vars,
    # which could silently mis-split under launchers that happen to set them).
    info = get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + offset) % info.num_workers, info.num_workers


# ------------------------------------------------------------------------------------ training stream


@dataclass(frozen=True)
class StreamSpec:
    """Everything a (possibly forked) worker needs to produce its part of the stream."""

    manifest: Manifest
    rank: int
    world_size: int
    batch_size: int
    seed: int
    shuffle: bool
    shuffle_buffer: int
    epoch_start: int
    allow_corrupt: bool
    decode: Callable[[dict[str, Any], ShardInfo, SkipLog], Any]
    collate: Callable[[list[Any]], dict[str, Any]]
    # Resume: per epoch, bool[split ids] of samples an earlier run already consumed (skipped here).
    consumed: dict[int, np.ndarray] | None = None
    worker_offset: int = 0
    caption_key: str = "txt"


@dataclass
class _EpochTally:
    produced: int = 0  # decoded samples
    dropped: int = 0  # skipped as consumed before a resume


class EpochStream(IterableDataset):
    """This rank's (and this worker's) endless sequence of full batches, epoch after epoch."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list[ShardInfo]:
        spec = self.spec
        order = epoch_shard_order(spec.manifest.shards, epoch, spec.seed, spec.shuffle)
        mine = split_round_robin(order, spec.rank, spec.world_size)
        return split_round_robin(mine, worker, num_workers)

    def _raw_epoch(self, epoch: int, worker: int, num_workers: int, skips: SkipLog) -> Iterator[Any]:
        """This worker's raw (encoded) samples of one epoch, in their shuffled order."""
        spec = self.spec
        shards = self.shards_for(epoch, worker, num_workers)
        kind = spec.manifest.kind
        raw = (
            (shard, sample)
            for shard in shards
            for sample in iter_raw_samples(shard, kind, skips, spec.caption_key)
        )
        if spec.shuffle and spec.shuffle_buffer > 1:
            # Shuffle encoded samples (small), decode after: the buffer never holds decoded images.
            rng = random.Random(f"dist_tempnet/samples/{spec.seed}/{epoch}/{spec.rank}/{worker}")
            raw = shuffled_through_buffer(raw, spec.shuffle_buffer, rng)
        return raw

    def _consumed_in(self, epoch: int) -> np.ndarray | None:
        return (self.spec.consumed or {}).get(epoch)

    def _nothing_left(self, epoch: int, worker: int, num_workers: int) -> bool:
        """Whether a resume filter already covers every id of this worker's shards in ``epoch``."""
        consumed = self._consumed_in(epoch)
        if consumed is None:
            return False
        base = self.spec.manifest.id_start
        shards = self.shards_for(epoch, worker, num_workers)
        return all(consumed[s.id_start - base : s.id_stop - base].all() for s in shards)

    def epoch_samples(
        self, epoch: int, worker: int, num_workers: int, skips: SkipLog, tally: _EpochTally | None = None
    ) -> Iterator[Any]:
        """Decoded samples of one epoch; ids consumed before a resume are dropped before decoding
        (after the shuffle buffer, so the remaining samples keep the uninterrupted order)."""
        tally = tally or _EpochTally()
        consumed, base = self._consumed_in(epoch), self.spec.manifest.id_start
        for shard, sample in self._raw_epoch(epoch, worker, num_workers, skips):
            if consumed is not None and consumed[sample["__id__"] - base]:
                tally.dropped += 1
                continue
            sample["__epoch__"] = epoch  # seeds the training crop (data.augment.TrainCrop)
            decoded = self.spec.decode(sample, shard, skips)
            if decoded is not None:
                tally.produced += 1
                yield decoded

    def __iter__(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        worker, num_workers = _worker_position(spec.worker_offset)
        skips = SkipLog(spec.allow_corrupt, tolerate_samples=spec.manifest.version == INDEX_VERSION)
        batch: list[Any] = []
        epochs: list[int] = []
        for epoch in itertools.count(spec.epoch_start):
            if self._nothing_left(epoch, worker, num_workers):
                continue
            tally = _EpochTally()
            for sample in self.epoch_samples(epoch, worker, num_workers, skips, tally):
                batch.append(sample)
                epochs.append(epoch)
                if len(batch) == spec.batch_size:
                    out = spec.collate(batch)
                    out.update(
                        {
                            _META_EPOCH: epoch,
                            _META_WORKER: worker,
                            _META_SKIPPED: (skips.count, skips.samples, skips.shards),
                            _META_SAMPLE_EPOCHS: torch.tensor(epochs, dtype=torch.long),
                        }
                    )
                    yield out
                    batch, epochs = [], []
            if tally.produced == 0 and tally.dropped == 0:
                # Without this, a rank whose shards are all corrupt (allow_corrupt) would spin forever.
                names = [s.name for s in self.shards_for(epoch, worker, num_workers)]
                raise RuntimeError(
                    f"rank {spec.rank} worker {worker}: epoch {epoch} produced no usable samples from "
                    f"shards {names} of {spec.manifest.path} ({skips.count} corrupt skips so far)"
                )


class BatchStream:
    """Iterator over training batches with progress counters for logging and checkpoints.

    ``samples_seen`` / ``batches_seen`` count what this rank delivered; ``epoch`` is the epoch the
    latest batch came from; ``corrupt_skipped`` counts corrupt shards/samples skipped (allow_corrupt);
    ``last_sample_epochs`` is the epoch of each sample of the latest batch. ``position_state()`` is the
    exact data position for a checkpoint (see :func:`resume_position`).
    Worker processes start on the first ``next()``; ``close()`` (or ``with``) stops them.
    """

    def __init__(
        self,
        dataset: EpochStream,
        num_workers: int,
        resume: StreamResume | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.samples_seen = resume.samples_seen if resume else 0
        self.batches_seen = resume.batches_seen if resume else 0
        self.epoch = dataset.spec.epoch_start
        self.last_sample_epochs: list[int] = []
        # Bitmaps start as the resume filter: ids some earlier rank consumed count as consumed here
        # too, so a later resume (with any world size) still knows about them.
        self._consumed: dict[int, np.ndarray] = {
            e: bits.copy() for e, bits in (dataset.spec.consumed or {}).items()
        }
        self._worker_epoch: dict[int, int] = {}
        self._next_worker = dataset.spec.worker_offset
        self._skipped_by_worker: dict[int, tuple[int, int, int]] = {}  # worker -> (events, samples, shards)
        self._source: Iterator[dict[str, Any]] | None = None
        self._closed = False

    @property
    def corrupt_skipped(self) -> int:
        return sum(c for c, _, _ in self._skipped_by_worker.values())

    @property
    def skipped_samples(self) -> int:
        """Samples this rank lost to corrupt data (allow_corrupt), the unread rest of shards included."""
        return sum(n for _, n, _ in self._skipped_by_worker.values())

    @property
    def skipped_shards(self) -> int:
        """Shards this rank could not read to the end (allow_corrupt); counted again in every epoch."""
        return sum(n for _, _, n in self._skipped_by_worker.values())

    @property
    def oldest_open_epoch(self) -> int:
        """Every epoch before this one is fully consumed by this rank (all its workers moved on)."""
        start = self.dataset.spec.epoch_start
        return min(self._worker_epoch.get(w, start) for w in range(max(1, self.num_workers)))

    def state_dict(self) -> dict[str, int]:
        """Progress counters (for logging); ``position_state()`` is what a checkpoint needs."""
        return {
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "batches_seen": self.batches_seen,
            "corrupt_skipped": self.corrupt_skipped,
        }

    def position_state(self) -> dict[str, Any]:
        """This rank's exact data position: per open epoch, the packed bitmap of consumed ids."""
        spec = self.dataset.spec
        return {
            "format": POSITION_FORMAT,
            "rank": spec.rank,
            "world_size": spec.world_size,
            "num_workers": self.num_workers,
            "seed": spec.seed,
            "shuffle": spec.shuffle,
            "id_range": [spec.manifest.id_start, spec.manifest.id_stop],
            "open_epoch": self.oldest_open_epoch,
            # Tensors, not numpy arrays: checkpoints load with weights_only=True.
            "consumed": {int(e): torch.from_numpy(np.packbits(bits)) for e, bits in self._consumed.items()},
            "next_worker": self._next_worker,
            **self.state_dict(),
        }

    def _record(self, sample_ids: torch.Tensor, sample_epochs: torch.Tensor, worker: int) -> None:
        spec = self.dataset.spec
        ids = sample_ids.numpy() - spec.manifest.id_start
        epochs = sample_epochs.numpy()
        for epoch in np.unique(epochs).tolist():
            bits = self._consumed.get(epoch)
            if bits is None:
                bits = self._consumed[epoch] = np.zeros(spec.manifest.num_samples, dtype=bool)
            bits[ids[epochs == epoch]] = True
        self._worker_epoch[worker] = int(epochs[-1])
        self._next_worker = (worker + 1) % max(1, self.num_workers)
        oldest = self.oldest_open_epoch
        for epoch in [e for e in self._consumed if e < oldest]:
            del self._consumed[epoch]
        self.last_sample_epochs = epochs.tolist()

    def _start(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            return iter(self.dataset)
        if self.dataset.spec.manifest.kind == "image_text":
            # HF tokenizers warns (and may deadlock) when forked after using its thread pool.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return iter(DataLoader(self.dataset, **self.loader_kwargs()))

    def loader_kwargs(self) -> dict[str, Any]:
        """How the DataLoader over worker processes is built (num_workers > 0): batches come collated
        from the workers, and are pinned by the DataLoader's pin thread when ``pin_memory``."""
        return {
            "batch_size": None,
            "num_workers": self.num_workers,
            "prefetch_factor": 2,
            "pin_memory": self.pin_memory,
        }

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("this batch stream was closed; create a new one (e.g. with epoch_start)")
        if self._source is None:
            self._source = self._start()
        batch = next(self._source)
        if self.pin_memory and self.num_workers == 0:  # no DataLoader (and no pin thread) in between
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.epoch = batch.pop(_META_EPOCH)
        worker = batch.pop(_META_WORKER)
        self._skipped_by_worker[worker] = tuple(int(v) for v in batch.pop(_META_SKIPPED))
        self._record(batch["sample_ids"], batch.pop(_META_SAMPLE_EPOCHS), worker)
        self.samples_seen += len(batch["sample_ids"])
        self.batches_seen += 1
        return batch

    def close(self) -> None:
        """Stop DataLoader workers (if any); the stream cannot be used afterwards."""
        source, self._source = self._source, None
        self._closed = True
        shutdown = getattr(source, "_shutdown_workers", None)  # DataLoader iterator
        if shutdown is not None:
            shutdown()
        elif source is not None:
            source.close()  # in-process generator: closes the shard file it has open

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------- exact resume


@dataclass(frozen=True)
class StreamResume:
    """Where a resumed training stream starts (built by :func:`resume_position`).

    ``consumed`` maps each epoch from ``epoch_start`` on that some earlier rank had started to a
    bool array over the split's ids (index = id - first id): those samples are skipped.
    """

    epoch_start: int
    consumed: dict[int, np.ndarray]
    worker_offset: int = 0
    samples_seen: int = 0
    batches_seen: int = 0


def _unpack(bits: np.ndarray, num_samples: int) -> np.ndarray:
    return np.unpackbits(np.asarray(bits, dtype=np.uint8), count=num_samples).astype(bool)


def _check_position(state: dict[str, Any], manifest: Manifest, source: str) -> None:
    if state.get("format") != POSITION_FORMAT:
        raise ValueError(f"{source}: not a data position (expected format {POSITION_FORMAT!r})")
    if list(state["id_range"]) != [manifest.id_start, manifest.id_stop]:
        raise ValueError(
            f"{source}: data position is for sample ids {state['id_range']}, but {manifest.path} holds "
            f"[{manifest.id_start}, {manifest.id_stop}): resuming on another dataset cannot be exact"
        )


def _finished_by(state: dict[str, Any], epoch: int, manifest: Manifest) -> np.ndarray:
    """Ids an old rank consumed in ``epoch``: all of its shards there if it had moved past the
    epoch, else its bitmap (which also holds what its own resume filter had excluded)."""
    if epoch < state["open_epoch"]:
        done = np.zeros(manifest.num_samples, dtype=bool)
        order = epoch_shard_order(manifest.shards, epoch, state["seed"], state["shuffle"])
        for shard in split_round_robin(order, state["rank"], state["world_size"]):
            done[shard.id_start - manifest.id_start : shard.id_stop - manifest.id_start] = True
        return done
    bits = state["consumed"].get(epoch)
    if bits is None:
        return np.zeros(manifest.num_samples, dtype=bool)
    return _unpack(bits, manifest.num_samples)


def resume_position(
    states: Sequence[dict[str, Any]], manifest: Manifest, rank: int, world_size: int, num_workers: int
) -> StreamResume:
    """The stream resume for ``rank`` of ``world_size`` from the position states of EVERY rank of
    an earlier run (``BatchStream.position_state()``, any world size or worker count)."""
    if not states:
        raise ValueError("resume_position needs the data positions of all ranks of the earlier run")
    for i, state in enumerate(states):
        _check_position(state, manifest, f"data position #{i}")
    first = min(s["open_epoch"] for s in states)
    last = max(max(x) for x in ([s["open_epoch"], *s["consumed"]] for s in states))
    consumed: dict[int, np.ndarray] = {}
    for epoch in range(first, last + 1):
        merged = np.zeros(manifest.num_samples, dtype=bool)
        for state in states:
            merged |= _finished_by(state, epoch, manifest)
        consumed[epoch] = merged
    while first in consumed and consumed[first].all():
        del consumed[first]
        first += 1
    old_world = len(states)
    mine = next((s for s in states if s["rank"] == rank), None)
    # The worker rotation only means something for the same ranks with the same workers.
    same_layout = old_world == world_size and mine is not None and mine["num_workers"] == num_workers
    counters = (
        mine
        if same_layout
        else {key: sum(s[key] for s in states) // world_size for key in ("samples_seen", "batches_seen")}
    )
    return StreamResume(
        epoch_start=first,
        consumed=consumed,
        worker_offset=mine["next_worker"] if same_layout else 0,
        samples_seen=counters["samples_seen"],
        batches_seen=counters["batches_seen"],
    )


def data_position(stream: BatchStream | None) -> dict[str, Any] | None:
    """A stream's position for a checkpoint (None before the task built its stream)."""
    return stream.position_state() if stream is not None else None


def resume_data_position(
    task_states: Sequence[dict[str, Any]], manifest: Manifest, rank: int, world_size: int, num_workers: int
) -> StreamResume | None:
    """`resume_position` over the ``data`` entries of every old rank's task state.

    Positions from before exact resume existed (only an epoch) restart at that epoch's beginning,
    with a warning: that epoch's samples already trained on are seen again.
    """
    positions = [state.get("data") for state in task_states]
    if all(p is None for p in positions):
        return None
    if any(p is None or "format" not in p for p in positions):
        epoch = min(int((p or {}).get("epoch", 0)) for p in positions)
        warnings.warn(
            f"checkpoint holds no exact data position: the data stream restarts at epoch {epoch}'s start",
            RuntimeWarning,
            stacklevel=2,
        )
        return StreamResume(epoch_start=epoch, consumed={})
    return resume_position(positions, manifest, rank, world_size, num_workers)


def _resume_fields(resume: StreamResume | None, epoch_start: int) -> dict[str, Any]:
    if resume is None:
        return {"epoch_start": epoch_start}
    return {
        "epoch_start": resume.epoch_start,
        "consumed": resume.consumed,
        "worker_offset": resume.worker_offset,
    }


def _check_stream_args(
    manifest: Manifest, batch_size: int, rank: int, world_size: int, num_workers: int
) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    readers = world_size * max(1, num_workers)
    if len(manifest.shards) < readers:
        raise ValueError(
            f"{manifest.path}: {len(manifest.shards)} shards cannot feed {world_size} ranks x "
            f"{max(1, num_workers)} workers ({readers} readers, each needs >= 1 shard); rewrite the data "
            "with a smaller samples_per_shard or use fewer workers"
        )


def _resolve_tokenizer(tokenizer: Any, manifest: Manifest) -> Any:
    from dist_tempnet.data.text_tokenizer import load_text_tokenizer

    if tokenizer is None:
        path = manifest.tokenizer_path
        if path is None:
            raise ValueError(f"{manifest.path}: metadata names no tokenizer; pass tokenizer=...")
        return load_text_tokenizer(path)
    if isinstance(tokenizer, (str, Path)):
        return load_text_tokenizer(tokenizer)
    return tokenizer


def _resolve_image_size(image_size: int | None, manifest: Manifest) -> int:
    size = image_size if image_size is not None else manifest.image_size
    if size is None:
        raise ValueError(f"{manifest.path}: images are not of one square size; pass image_size=...")
    return int(size)


def _manifest_of_kind(manifest_or_dir: ManifestLike, split: str | None, kind: str) -> Manifest:
    manifest = resolve_manifest(manifest_or_dir, split, default_split="train")
    if manifest.kind != kind:
        raise ValueError(f"{manifest.path}: holds {manifest.kind!r} samples, this reader needs {kind!r}")
    return manifest


def _training_stream(
    manifest: Manifest, decode: Callable[..., Any], collate: Callable[[list[Any]], dict[str, Any]],
    batch_size: int, rank: int, world_size: int, num_workers: int, shuffle_buffer: int, seed: int,
    allow_corrupt: bool, epoch_start: int, shuffle: bool, resume: StreamResume | None,
    caption_key: str = "txt", pin_memory: bool = False,
) -> BatchStream:  # fmt: skip
    """The endless stream both training readers share; they differ only in decode/collate."""
    _check_stream_args(manifest, batch_size, rank, world_size, num_workers)
    check_shards_on_disk(manifest, allow_corrupt)
    spec = StreamSpec(
        manifest=manifest, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
        shuffle=shuffle, shuffle_buffer=shuffle_buffer, allow_corrupt=allow_corrupt, decode=decode,
        collate=collate, caption_key=caption_key, **_resume_fields(resume, epoch_start),
    )  # fmt: skip
    return BatchStream(EpochStream(spec), num_workers, resume, pin_memory)


def clip_batches(
    manifest_or_dir: ManifestLike,
    split: str | None = None,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Any = None,
    image_size: int | None = None,
    num_workers: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int = 0,
    max_text_len: int = DEFAULT_MAX_TEXT_LEN,
    allow_corrupt: bool = False,
    epoch_start: int = 0,
    shuffle: bool = True,
    resume: StreamResume | None = None,
    caption_key: str = "txt",
    crop_scale: tuple[float, float] | None = None,
    pin_memory: bool = False,
) -> BatchStream:
    """Endless image-text training batches for one rank.

    ``manifest_or_dir``: a Manifest, a dataset.json, a split directory, or a dataset root (then
    ``split``, default "train", picks the sub-directory; an explicit ``split`` must match).

    Each batch: ``pixel_values`` uint8 [B, 3, H, W] (normalize on the device with
    :func:`normalize_pixels`: a quarter of float32's bytes to copy), ``input_ids`` int64 [B, L],
    ``attention_mask`` int64 [B, L] (L = max_text_len), ``sample_ids`` int64 [B], ``labels`` int64 [B]
    (class index, -1 when the data has none). ``tokenizer``: a tokenizer object, a path, or None for
    the manifest's own tokenizer. ``image_size``: None keeps the stored size (images are resized and
    center-cropped otherwise). ``resume`` (from :func:`resume_position`) continues an earlier run's
    exact data position and overrides ``epoch_start``. ``pin_memory``: deliver batches in pinned
    host memory (see :func:`pin_memory_for`).
    """
    manifest = _manifest_of_kind(manifest_or_dir, split, "image_text")
    size = _resolve_image_size(image_size, manifest)
    transform = TrainCrop(size, tuple(crop_scale), seed) if crop_scale is not None else None
    decode = ImageTextDecoder(size, caption_key, transform)
    collate = ImageTextCollator(_resolve_tokenizer(tokenizer, manifest), max_text_len)
    return _training_stream(manifest, decode, collate, batch_size, rank, world_size, num_workers,
                            shuffle_buffer, seed, allow_corrupt, epoch_start, shuffle, resume,
                            caption_key, pin_memory)  # fmt: skip


def token_batches(
    manifest_or_dir: ManifestLike,
    split: str | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int = 0,
    allow_corrupt: bool = False,
    epoch_start: int = 0,
    shuffle: bool = True,
    resume: StreamResume | None = None,
    pin_memory: bool = False,
) -> BatchStream:
    """Endless language-model batches: ``input_ids`` int64 [B, seq_len + 1], ``sample_ids`` int64 [B],
    and for chat shards ``loss_mask`` bool [B, seq_len + 1] (True where the token is a loss target).

    Inputs are ``input_ids[:, :-1]`` and next-token labels ``input_ids[:, 1:]``. ``resume``,
    ``pin_memory``: as in :func:`clip_batches`.
    """
    manifest = _manifest_of_kind(manifest_or_dir, split, "tokens")
    return _training_stream(manifest, TokenDecoder(manifest.seq_len), collate_tokens, batch_size, rank,
                            world_size, num_workers, shuffle_buffer, seed, allow_corrupt, epoch_start,
                            shuffle, resume, pin_memory=pin_memory)  # fmt: skip


# ------------------------------------------------------------------------------------ evaluation pass


def rank_id_range(manifest: Manifest, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's contiguous slice of the split's ids (sizes differ by at most one across ranks)."""
    n = manifest.num_samples
    return manifest.id_start + n * rank // world_size, manifest.id_start + n * (rank + 1) // world_size


class EvalBatches:
    """A finite, deterministic pass over this rank's slice of a split; iterable any number of times.

    ``len()`` is the number of batches (the last may be partial; fewer if corrupt samples are skipped
    under allow_corrupt); ``num_samples`` is this rank's sample count. Ranks may get one batch more or
    less than each other: gather results after the loop, not inside it.
    """

    def __init__(
        self,
        manifest: Manifest,
        rank: int,
        world_size: int,
        batch_size: int,
        decode: Callable[..., Any],
        collate: Callable[[list[Any]], dict[str, Any]],
        allow_corrupt: bool,
        caption_key: str = "txt",
    ) -> None:
        self.manifest = manifest
        self.batch_size = batch_size
        self.id_start, self.id_stop = rank_id_range(manifest, rank, world_size)
        self.decode = decode
        self.collate = collate
        self.allow_corrupt = allow_corrupt
        self.caption_key = caption_key
        self.corrupt_skipped = 0

    @property
    def num_samples(self) -> int:
        return self.id_stop - self.id_start

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def _samples(self, skips: SkipLog) -> Iterator[Any]:
        for shard in self.manifest.shards:
            if shard.id_stop <= self.id_start or shard.id_start >= self.id_stop:
                continue
            for raw in iter_raw_samples(shard, self.manifest.kind, skips, self.caption_key):
                if self.id_start <= raw["__id__"] < self.id_stop:
                    decoded = self.decode(raw, shard, skips)
                    if decoded is not None:
                        yield decoded

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skips = SkipLog(self.allow_corrupt, tolerate_samples=self.manifest.version == INDEX_VERSION)
        batch: list[Any] = []
        for sample in self._samples(skips):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
            self.corrupt_skipped = skips.count
        if batch:
            yield self.collate(batch)
        self.corrupt_skipped = skips.count


def eval_batches(
    manifest_or_dir: ManifestLike,
    split: str | None = None,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Any = None,
    image_size: int | None = None,
    max_text_len: int = DEFAULT_MAX_TEXT_LEN,
    allow_corrupt: bool = False,
    caption_key: str = "txt",
) -> EvalBatches:
    """One ordered pass over a split (image-text or tokens; same batch keys as the training streams).

    ``split`` defaults to "eval" when ``manifest_or_dir`` is a dataset root.

    With ``world_size > 1`` each rank reads a disjoint contiguous id range; together they cover every
    sample exactly once.
    """
    manifest = resolve_manifest(manifest_or_dir, split, default_split="eval")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            "need batch_size >= 1 and 0 <= rank < world_size, got "
            f"batch_size={batch_size} rank={rank} world_size={world_size}"
        )
    check_shards_on_disk(manifest, allow_corrupt)
    if manifest.kind == "image_text":
        decode: Callable[..., Any] = ImageTextDecoder(_resolve_image_size(image_size, manifest), caption_key)
        collate: Callable[[list[Any]], dict[str, Any]] = ImageTextCollator(
            _resolve_tokenizer(tokenizer, manifest), max_text_len
        )
    else:
        decode, collate = TokenDecoder(manifest.seq_len), collate_tokens
    return EvalBatches(manifest, rank, world_size, batch_size, decode, collate, allow_corrupt, caption_key)
