"""Where checkpoints go, and where a (re)started run finds the one to continue from.

Under Ray Train V2 every rank saves into its own temporary directory and reports it
(`ray.train.report(..., checkpoint=Checkpoint.from_directory(d))`); Ray merges the ranks' files
into one persisted checkpoint and hands it back through `ray.train.get_checkpoint()` on restart.
Without Ray, checkpoints go to `<output_dir>/<run name>/checkpoints/step_<n>` on a shared path,
written under a temporary name and renamed once complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from dist_tempnet import comm
from dist_tempnet.config import Config
from dist_tempnet.runtime.checkpoint.layout import (
    COMPLETE,
    _barrier,
    complete_checkpoints,
    retained_checkpoints,
    write_rank_files,
)
from dist_tempnet.runtime.checkpoint.restore import ResumePoint
from dist_tempnet.runtime.faults import FaultPlan, InjectedFault
from dist_tempnet.runtime.spec import WorkerSpec
from dist_tempnet.runtime.storage import is_uri, scheme_of


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the message names the directory)."""


class CheckpointSink:
    """Where checkpoints go and where a (re)started run finds the one to continue from.

    `resume_from` is an explicit checkpoint (manual resume); checkpoints this run wrote itself
    (a restart after a failure) take precedence over it.
    """

    resume_from: Path | None = None
    # Seconds of the latest save by phase (e.g. write, upload, wait), for logging.
    last_timing: dict[str, float] = {}

    def save(
        self,
        engine,
        step: int,
        task_state: dict[str, Any],
        config: dict[str, Any],
        metrics: dict[str, float],
        extra: dict[str, Any],
    ) -> str:
        raise NotImplementedError

    def resume_point(self) -> AbstractContextManager[ResumePoint | None]:
        """The checkpoint a (re)started run continues from, readable while the context is open."""
        raise NotImplementedError

    def _explicit(self) -> ResumePoint | None:
        return ResumePoint(self.resume_from, "manual") if self.resume_from is not None else None


class LocalSink(CheckpointSink):
    """Checkpoints on a path all ranks share; keeps the newest `keep_last` (plus the best one)."""

    def __init__(
        self, root: Path, keep_last: int, resume_from: Path | None = None, fault: FaultPlan | None = None,
        keep_best_metric: str = "", keep_best_mode: str = "max",
    ) -> None:  # fmt: skip
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best_metric = keep_best_metric
        self.keep_best_mode = keep_best_mode
        self.resume_from = Path(resume_from) if resume_from else None
        self.fault = fault or FaultPlan()

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.root)

    def save(self, engine, step, task_state, config, metrics, extra) -> str:
        t0 = time.perf_counter()
        final = self.root / f"step_{step:08d}"
        staging = self.root / f".tmp-step_{step:08d}"
        if comm.rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        _barrier()
        try:
            write_rank_files(staging, engine, step, task_state, config, metrics, extra, self.fault)
            _barrier()
            if comm.rank() == 0:
                (staging / COMPLETE).write_text(str(step))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staging, final)
                self._apply_retention()
        except InjectedFault:
            raise  # stands for a crash: nothing would clean up after one
        except (OSError, RuntimeError) as exc:
            # Disk full / quota: torch's writer says only "basic_ios::clear". Name the path, and do not
            # leave a staging directory (or a half-moved step) behind; earlier checkpoints stay.
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointWriteError(
                f"writing checkpoint step {step} to {staging} failed ({type(exc).__name__}: {exc}); "
                f"is {self.root} out of space or quota? (staging directory removed)"
            ) from exc
        _barrier()
        self.last_timing = {"write_s": time.perf_counter() - t0}
        return str(final)

    def _apply_retention(self) -> None:
        found = self.complete_checkpoints()
        keep = retained_checkpoints(found, self.keep_last, self.keep_best_metric, self.keep_best_mode)
        for old in found:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)
        # Staging directories of crashed saves: never complete, never loaded, only in the way.
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    @contextlib.contextmanager
    def resume_point(self) -> Iterator[ResumePoint | None]:
        # Without Ray nothing restarts a run by itself: an explicit resume wins over the run's own.
        if self.resume_from is not None:
            yield self._explicit()
            return
        found = self.complete_checkpoints()
        yield ResumePoint(found[-1], "restart") if found else None


class RaySink(CheckpointSink):
    """Ray Train V2: per-rank temporary directories merged by Ray on report."""

    def __init__(
        self, resume_from: Path | None = None, fault: FaultPlan | None = None, scheme: str = ""
    ) -> None:
        self.resume_from = Path(resume_from) if resume_from else None
        self.fault = fault or FaultPlan()
        # Ray's storage paths lack the scheme of an object store (s3://): put it back for the URIs we log.
        self.prefix = f"{scheme}://" if scheme else ""

    def save(self, engine, step, task_state, config, metrics, extra) -> str:
        import ray.train

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="dist-tempnet-ckpt-") as tmp:
            directory = Path(tmp)
            write_rank_files(directory, engine, step, task_state, config, metrics, extra, self.fault)
            if comm.rank() == 0:
                (directory / COMPLETE).write_text(str(step))
            _barrier()
            t1 = time.perf_counter()
            ray.train.report(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"step": step},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step_{step:08d}",
            )
            t2 = time.perf_counter()
        _wait_until_collected()
        waited = time.perf_counter() - t2
        self.last_timing = {"write_s": t1 - t0, "upload_s": t2 - t1, "registered_wait_s": waited}
        storage = ray.train.get_context().get_storage()
        return self.prefix + str(storage.build_checkpoint_path_from_name(f"step_{step:08d}"))

    @contextlib.contextmanager
    def resume_point(self) -> Iterator[ResumePoint | None]:
        import ray.train

        # A fresh Ray run (launcher gives manual resumes a new Ray run name) has no checkpoint of
        # its own until its first report, so a non-None one means a restart after a failure.
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield self._explicit()
            return
        with checkpoint.as_directory() as d:
            yield ResumePoint(Path(d), "restart")


def _wait_until_collected() -> None:
    """Block until Ray Train's controller has taken this worker's report off its queue.

    `ray.train.report` only queues the result; the controller polls workers every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s) and registers the checkpoint once every rank's report
    is in. A worker killed before that poll loses the report, and the restart would go back one
    checkpoint further than necessary. Uses Ray Train V2 internals (pinned Ray 2.60); without them
    it returns at once.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        queue = get_train_context().get_result_queue()
    except (ImportError, AttributeError):
        return
    queue.join()


def make_sink(cfg: Config, spec: WorkerSpec) -> CheckpointSink:
    resume_from = spec.resume_from or None
    fault = FaultPlan.from_env()
    if spec.under_ray:
        output_dir = cfg.run.output_dir
        return RaySink(resume_from, fault, scheme_of(output_dir) if is_uri(output_dir) else "")
    root = Path(cfg.run.output_dir).resolve() / cfg.run.name / "checkpoints"
    return LocalSink(root, cfg.checkpoint.keep_last, resume_from, fault,
                     cfg.checkpoint.keep_best_metric, cfg.checkpoint.keep_best_mode)  # fmt: skip
