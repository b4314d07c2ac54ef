"""Fault injection and sample-id logging for tests and drills (never active unless asked for).

`DIST_TEMPNET_FAULT` (see `FaultPlan`) kills a rank, crashes a save, poisons the loss or holds
every rank at a step (while a test kills a whole node from outside);
`DIST_TEMPNET_SEEN_IDS` (see `SeenIdsLog`) makes every rank log the sample ids it trains on, so a
test can prove that a resumed run saw every sample exactly once. The driver forwards both
variables to Ray workers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_tempnet import comm

logger = logging.getLogger(__name__)

FAULT_ENV = "DIST_TEMPNET_FAULT"
# A directory where every rank appends the sample ids of each micro batch it trains on
# (seen_rank<r>.jsonl), with a marker line at every resume.
SEEN_IDS_ENV = "DIST_TEMPNET_SEEN_IDS"


class InjectedFault(RuntimeError):
    """Raised by a `crash_in_save_step` fault."""


# DIST_TEMPNET_FAULT key -> FaultPlan field (all integers; once_file is the one string).
_FAULT_FIELDS = {
    "kill_rank": "kill_rank",
    "step": "kill_step",
    "crash_in_save_step": "crash_in_save_step",
    "rank": "crash_rank",
    "nan_step": "nan_step",
    "nan_from_step": "nan_from_step",
    "nan_micro": "nan_micro",
    "hold_step": "hold_step",
    "hold_s": "hold_s",
}


@dataclass
class FaultPlan:
    """Faults a test asks for through `DIST_TEMPNET_FAULT="key=value,..."`:

    - `kill_rank=R,step=S`: rank R SIGKILLs itself right after optimizer step S (before any
      checkpoint of that step);
    - `crash_in_save_step=K`: every rank (or only `rank=R`) raises inside the save of step K, after
      DeepSpeed and the rank files are written but before the checkpoint is marked complete;
    - `nan_step=K`: the loss of step K is NaN; `nan_from_step=K`: every loss from step K on;
      `nan_micro=M` narrows either to micro-batch M of each such step (gradient accumulation);
    - `hold_step=S`: every rank waits after optimizer step S (the checkpoints of earlier steps are
      registered by then) for up to `hold_s` seconds (default 600), so that a test can act from
      outside at a known point, e.g. kill a whole node; then it trains on;
    - `once_file=PATH`: each fault fires once per rank (PATH.<fault>.rank<r> records it, with the
      time), so the restarted workers run clean.
    """

    kill_rank: int | None = None
    kill_step: int | None = None
    crash_in_save_step: int | None = None
    crash_rank: int | None = None
    nan_step: int | None = None
    nan_from_step: int | None = None
    nan_micro: int | None = None
    hold_step: int | None = None
    hold_s: int = 600
    once_file: str = ""

    @classmethod
    def from_env(cls) -> FaultPlan:
        spec = os.environ.get(FAULT_ENV, "").strip()
        if not spec:
            return cls()
        raw = dict(item.strip().split("=", 1) for item in spec.split(",") if item.strip())
        unknown = set(raw) - set(_FAULT_FIELDS) - {"once_file"}
        if unknown:
            raise ValueError(f"{FAULT_ENV}: unknown keys {sorted(unknown)} in {spec!r}")
        fields = {_FAULT_FIELDS[k]: int(v) for k, v in raw.items() if k in _FAULT_FIELDS}
        return cls(once_file=raw.get("once_file", ""), **fields)

    def _claim(self, fault: str, rank: int) -> bool:
        """True the first time this rank fires this fault (always without a once_file)."""
        if not self.once_file:
            return True
        marker = f"{self.once_file}.{fault}.rank{rank}"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"fired_unix": time.time(), "rank": rank}, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def after_step(self, step: int, rank: int) -> None:
        if self.kill_step == step and self.kill_rank == rank and self._claim("kill", rank):
            logger.info(f"fault injection: SIGKILL rank {rank} after step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hold_step == step and self._claim("hold", rank):
            # The marker _claim wrote tells the test that this rank is here.
            logger.info(f"fault injection: rank {rank} holds after step {step} for up to {self.hold_s}s")
            time.sleep(self.hold_s)

    def in_save(self, step: int, rank: int) -> None:
        if self.crash_in_save_step != step or self.crash_rank not in (None, rank):
            return
        if self._claim("crash_in_save", rank):
            raise InjectedFault(f"fault injection: crash inside the checkpoint save of step {step}")

    def poisons_loss(self, step: int, micro: int = 0) -> bool:
        """Whether the loss of micro-batch `micro` of optimizer step `step` is to be made NaN."""
        if self.nan_micro is not None and micro != self.nan_micro:
            return False
        return self.nan_step == step or (self.nan_from_step is not None and step >= self.nan_from_step)


class SeenIdsLog:
    """Appends the sample ids of every micro batch to `$DIST_TEMPNET_SEEN_IDS/seen_rank<r>.jsonl`.

    Lines: {"attempt", "step", "micro", "rank", "world", "ids", "epochs"}, and at a resume
    {"attempt", "resume_step"}: the steps after it that earlier attempts had logged were redone by
    this one (see `seen_ids_by_epoch`). `attempt` is rank 0's start time, shared by all ranks.
    """

    def __init__(self, path: Path, rank: int, world: int, attempt: float) -> None:
        self.path, self.rank, self.world, self.attempt = path, rank, world, attempt

    @classmethod
    def from_env(cls, rank: int, world: int, device: torch.device) -> SeenIdsLog | None:
        directory = os.environ.get(SEEN_IDS_ENV, "")
        if not directory:
            return None
        Path(directory).mkdir(parents=True, exist_ok=True)
        start = torch.tensor([time.time() if rank == 0 else 0.0], dtype=torch.float64, device=device)
        attempt = float(comm.all_reduce_sum(start).item())
        return cls(Path(directory) / f"seen_rank{rank}.jsonl", rank, world, attempt)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"attempt": self.attempt, **record}) + "\n")

    def mark_resume(self, step: int) -> None:
        self._append({"resume_step": step, "rank": self.rank})

    def record(self, step: int, micro: int, batch: dict[str, Any], stream: Any) -> None:
        ids = batch["sample_ids"].tolist()
        epochs = list(getattr(stream, "last_sample_epochs", []) or [-1] * len(ids))
        self._append(
            {
                "step": step,
                "micro": micro,
                "rank": self.rank,
                "world": self.world,
                "ids": ids,
                "epochs": epochs,
            }
        )


def seen_batches(directory: str | os.PathLike) -> dict[tuple[int, int, int], dict[str, Any]]:
    """The micro batches trained on, by (step, micro, rank), across restarts: a resume to step s
    drops what earlier attempts logged for steps after s (the resumed attempt trained them again)."""
    lines = []
    for path in Path(directory).glob("seen_rank*.jsonl"):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept: dict[tuple[float, int, int, int], dict[str, Any]] = {}
    for rec in sorted(lines, key=lambda r: (r["attempt"], "resume_step" not in r)):
        if "resume_step" in rec:
            kept = {k: v for k, v in kept.items() if k[1] <= rec["resume_step"] or k[0] == rec["attempt"]}
        else:
            kept[(rec["attempt"], rec["step"], rec["micro"], rec["rank"])] = rec
    return {key[1:]: {"ids": rec["ids"], "epochs": rec["epochs"]} for key, rec in sorted(kept.items())}


def seen_ids_by_epoch(directory: str | os.PathLike) -> dict[int, list[int]]:
    """Sample ids trained on in each epoch (see `seen_batches`)."""
    by_epoch: dict[int, list[int]] = {}
    for rec in seen_batches(directory).values():
        for sample_id, epoch in zip(rec["ids"], rec["epochs"]):
            by_epoch.setdefault(epoch, []).append(sample_id)
    return by_epoch
