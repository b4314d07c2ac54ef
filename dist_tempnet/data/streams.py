"""Training streams over the shards: infinite, reshuffled, every sample once per epoch.

Training streams are step-based: every rank must be able to produce a batch at every step (ranks run
collectives each step), so they never end -- epoch after epoch -- and always yield full batches. Per
epoch ``e`` the shard list is shuffled with a generator seeded from ``(seed, e)`` -- the same order on
every rank -- then dealt out round-robin to ranks (the ``split_by_node`` rule, with rank/world_size
given explicitly because we may not be under torch.distributed yet) and then to DataLoader workers
(the ``split_by_worker`` rule). Within a worker a shuffle buffer mixes samples; it drains at the end
of each epoch so every sample appears exactly once per epoch on exactly one rank (when shards divide
evenly).

A :class:`BatchStream` records, per epoch still in flight, which sample ids it has delivered (a
bitmap over the split's ids); ``position_state()`` returns them for a checkpoint and a
:class:`StreamResume` (data.resume) makes a new stream skip them. The readers that build these
streams are in data.loaders.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_tempnet.data.manifest import INDEX_VERSION, Manifest, ShardInfo
from dist_tempnet.data.reader import SkipLog, iter_raw_samples

# Per-batch bookkeeping sent from a worker to the main process, stripped before the user sees it.
_META_EPOCH, _META_WORKER, _META_SKIPPED = "_epoch", "_worker", "_corrupt_skipped"
_META_SAMPLE_EPOCHS = "_sample_epochs"
POSITION_FORMAT = "dist_tempnet.data_position/v1"


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
