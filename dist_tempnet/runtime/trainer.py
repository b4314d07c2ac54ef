"""The per-worker training loop: one loop for every task.

A task (dist_tempnet.tasks) supplies the module DeepSpeed wraps, its parameter groups, the batch
stream, the forward step and evaluation; this file owns what is common: distributed setup, the
DeepSpeed engine, gradient accumulation, non-finite guards, logging, evaluation and checkpoints.

It runs under Ray Train (driver.launcher) or on its own, one process per rank with the usual
torch.distributed environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which is
how it runs on a machine without Ray: `python -m dist_tempnet.train --config ...`
(commands/worker.py). Nothing here imports Ray or MLflow at module level.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_tempnet import comm
from dist_tempnet import metric_names as names
from dist_tempnet.config import Config, config_from_dict
from dist_tempnet.runtime.checkpoint import CheckpointSink, checkpoint_bytes, make_sink
from dist_tempnet.runtime.checkpoint.restore import checked_meta, load_into, needs_universal, universal_copy
from dist_tempnet.runtime.engine import build_engine, group_lrs
from dist_tempnet.runtime.faults import FaultPlan, SeenIdsLog
from dist_tempnet.runtime.logs import configure_logging
from dist_tempnet.runtime.nonfinite import any_rank, poisoned, skip_optimizer_step
from dist_tempnet.runtime.spec import WorkerSpec
from dist_tempnet.runtime.tracking import Tracker, log_tau_histogram, spool_path
from dist_tempnet.tasks import build_task
from dist_tempnet.tau_stats import TauHealth

logger = logging.getLogger(__name__)


def tau_settling_steps(cfg: Config) -> int:
    """Steps before τ health may call τ "still": the warm-up, plus the steps TempNet is held frozen
    on purpose (loss.tempnet_freeze_steps; its lr then rises with the schedule, not from zero)."""
    frozen = cfg.loss.tempnet_freeze_steps if cfg.loss.name in ("isogclr_tempnet", "tempnet") else 0
    return cfg.train.warmup_steps + frozen


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> torch.device:
    """Join the process group Ray (or torchrun) set up, or make a world of one."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    # DeepSpeed insists on LOCAL_RANK even when the process group already exists (e.g. a test
    # harness that initialized it): on one node the local rank is the global rank.
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressLine:
    """A compact per-N-step line on rank 0: step, loss, τ, throughput, ETA."""

    def __init__(self, total: int, unit: str, enabled: bool) -> None:
        self.total, self.unit, self.enabled = total, unit, enabled

    def show(self, step: int, metrics: dict[str, float], elapsed: float, steps_done: int) -> None:
        if not self.enabled:
            return
        rate = metrics.get(names.per_s(self.unit), 0.0)
        eta = elapsed / max(1, steps_done) * (self.total - step)
        tau = metrics.get(f"{names.TAU}mean", float("nan"))
        logger.info(
            f"step {step}/{self.total} | loss {metrics.get(names.LOSS, float('nan')):.4f} | "
            f"tau {tau:.4f} | {rate:,.0f} {self.unit}/s | eta {_fmt_eta(eta)}",
        )


class Trainer:
    """Owns the engine and the loop; the task supplies everything task-specific."""

    def __init__(self, cfg: Config, spec: WorkerSpec | None, sink: CheckpointSink) -> None:
        spec = spec or WorkerSpec(cfg.to_dict())
        self.cfg = cfg
        self.device = init_distributed()
        self.rank, self.world = comm.rank(), comm.world_size()
        seed_everything(cfg.run.seed)
        self.task = build_task(cfg, self.rank, self.world, self.device)
        self.sink = sink
        self.fault = FaultPlan.from_env()
        self.tracking_uri = spec.tracking_uri
        self.under_ray = spec.under_ray
        self.tracker = self._tracker(spec)
        self.step = 0
        self.resumed_step: int | None = None
        self.resume_count = 0
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self.last_metrics: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        prefixes = self.task.tau_prefixes()
        lo = cfg.loss
        self.tau_health = (
            TauHealth(prefixes, lo.tau_min, lo.tau_max, tau_settling_steps(cfg)) if prefixes else None
        )
        self._warned_data = False
        # The checkpoint to continue from decides how the engine is built (universal loading after
        # a change of world size), so it is found first and stays readable until it is loaded.
        with sink.resume_point() as point:
            meta = checked_meta(point.directory) if point else None
            universal = meta is not None and needs_universal(meta, self.world)
            self.engine = build_engine(
                self.task.module, self.task.param_groups(), cfg, load_universal=universal
            )
            self.task.after_engine(self.engine)
            if point is not None:
                source = universal_copy(point.directory, meta) if universal else contextlib.nullcontext()
                with source as root:
                    loaded = load_into(point.directory, meta, self.engine, self.task, root)
                self._resumed(loaded | {"resume_kind": point.kind})
        self.batches = self.task.batches()
        self.seen_log = SeenIdsLog.from_env(self.rank, self.world, self.device)
        if self.seen_log and self.resumed_step is not None:
            self.seen_log.mark_resume(self.resumed_step)

    def _tracker(self, spec: WorkerSpec) -> Tracker:
        if self.rank != 0 or not spec.mlflow_run_id:
            return Tracker.disabled()
        try:
            return Tracker(spec.tracking_uri, spec.mlflow_run_id, spool=spool_path(self.cfg))
        except Exception as exc:  # noqa: BLE001 - e.g. mlflow not installed on a bare GPU box
            logger.warning(f"MLflow disabled on rank 0: {exc}")
            return Tracker.disabled()

    def _resumed(self, meta: dict[str, Any]) -> None:
        self.step = self.resumed_step = int(meta["step"])
        self.resumed_from = meta["path"]
        self.resumed_at = time.time()
        old_world = int(meta["world_size"])
        if self.rank == 0:
            logger.info(
                f"resumed ({meta.get('resume_kind', 'restart')}) from {meta['path']} at step "
                f"{self.step}"
                + (f", elastic: {old_world} → {self.world} workers" if old_world != self.world else ""),
            )
            if old_world != self.world:
                self._announce_elastic(meta)
        self._log_resume(meta)

    def _announce_elastic(self, meta: dict[str, Any]) -> None:
        old_cfg = meta["config"]["train"]
        old_world = int(meta["world_size"])
        old_accum = old_cfg["global_batch_size"] // (old_world * old_cfg["micro_batch_size"])
        t = self.cfg.train
        logger.info(
            f"elastic resume: global batch {old_cfg['global_batch_size']} → "
            f"{t.global_batch_size}, gradient accumulation {old_accum} → "
            f"{self.engine.gradient_accumulation_steps()}; DRO state re-sharded, data position remapped "
            "(no sample of the epoch skipped or repeated)",
        )
        if old_cfg["global_batch_size"] != t.global_batch_size:
            logger.warning(
                "train.global_batch_size differs from the checkpoint's: the "
                "optimization is not the one the interrupted run would have done",
            )

    def _log_resume(self, meta: dict[str, Any]) -> None:
        """MLflow: how often this run resumed, from which step, and why (rank 0 only)."""
        if not self.tracker.enabled:
            return
        count = self._previous_resume_count(meta) + 1
        kind = meta.get("resume_kind", "restart")
        tags = {
            "resumed_from": meta["path"],
            "resume_kind": kind,
            "last_resume_unix": f"{self.resumed_at:.3f}",
        }
        if kind == "restart":
            # The worker only learns that the group was restarted; the error itself is in Ray's logs.
            tags["last_failure"] = (
                f"worker group restarted after a failure at {time.strftime('%Y-%m-%d %H:%M:%S')}; resumed "
                f"from step {self.step} (see the Ray Train logs for the error)"
            )
        self.tracker.set_tags(tags)
        self.tracker.log_metrics(
            {
                "resume_count": float(count),
                "resumed_from_step": float(self.step),
                "resume_world_size": float(self.world),
            },
            self.step,
        )
        self.resume_count = count

    def _previous_resume_count(self, meta: dict[str, Any]) -> int:
        # The run's own metric counts resumes that left no checkpoint behind (failed again before the
        # next save); the checkpoint's value is the fallback when MLflow cannot be read.
        try:
            run = self.tracker.client.get_run(self.tracker.run_id)
            return int(run.data.metrics.get("resume_count", 0))
        except Exception:  # noqa: BLE001 - tracking must never stop a resume
            return int(meta.get("resume_count", 0))

    # -- one optimizer step -------------------------------------------------------------------

    def train_step(self) -> dict[str, float] | None:
        """Gradient-accumulated step; returns metrics, or None when it was skipped as non-finite.

        A non-finite loss in any micro-batch on any rank skips the whole optimizer step
        (runtime.nonfinite): decided after the last forward, from one all-reduced flag."""
        engine, accum = self.engine, self.engine.gradient_accumulation_steps()
        step_metrics: dict[str, Any] = {}
        units = 0
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        skip = False
        for micro in range(accum):
            batch = next(self.batches)
            if self.seen_log:
                self.seen_log.record(self.step + 1, micro, batch, self.batches)
            batch = to_device(batch, self.device)
            units += self.task.units(batch)
            result = self.task.forward(engine, batch)
            loss = result.loss
            if self.fault.poisons_loss(self.step + 1, micro):
                loss = loss * float("nan")
            nonfinite |= ~torch.isfinite(loss.detach()).all()
            if micro == accum - 1:
                skip = any_rank(nonfinite)
                if skip:
                    loss = poisoned(loss)
            engine.backward(loss)
            if skip:
                skip_optimizer_step(engine)
            else:
                engine.step()
            for k, v in result.metrics.items():  # device tensors: no host sync here
                step_metrics[k] = step_metrics.get(k, 0.0) + v / accum
        if skip:
            self.nonfinite_skipped += 1
            self.consecutive_nonfinite += 1
            return None
        self.consecutive_nonfinite = 0
        step_metrics["units"] = units
        return step_metrics

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        progress = ProgressLine(cfg.train.steps, self.task.unit, self.rank == 0)
        if self.rank == 0:
            logger.info(
                f"{cfg.run.task}/{cfg.loss.name}: {self.world} worker(s), "
                f"ZeRO-{cfg.deepspeed.zero_stage}, "
                f"{cfg.train.precision}, global batch {cfg.train.global_batch_size}, "
                f"accumulation {self.engine.gradient_accumulation_steps()}, {cfg.train.steps} steps",
            )
        tags = {"status_detail": "training", "world_size": self.world}
        if self.under_ray:
            tags["ray_node_ids"] = _ray_node_ids()
        self.tracker.set_tags(tags)
        t_start = time.perf_counter()
        window_t, window_units, steps_in_window = time.perf_counter(), 0, 0
        start_step = self.step
        while self.step < cfg.train.steps:
            sched = self.task.before_step(self.step)
            metrics = self.train_step()
            self.step += 1
            self.fault.after_step(self.step, self.rank)
            if self.resumed_step is not None and self.step == self.resumed_step + 1:
                self._note_training_resumed()
            if metrics is None:
                self._on_nonfinite()
                continue
            window_units += metrics.pop("units")
            steps_in_window += 1
            if self.tau_health and self.step == start_step + 1:
                self.tau_health.start(metrics)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                now = time.perf_counter()
                elapsed_window = now - window_t
                rate = window_units * self.world / max(elapsed_window, 1e-9)
                logged = self._reduce_metrics(metrics)
                logged.update(sched)
                logged.update({f"{names.LR}{k}": v for k, v in group_lrs(self.engine).items()})
                logged[names.per_s(self.task.unit)] = rate
                logged[names.per_s_per_worker(self.task.unit)] = rate / self.world
                logged["nonfinite_skipped"] = float(self.nonfinite_skipped)
                logged.update(self._data_metrics())
                self.tracker.log_metrics(logged, self.step)
                progress.show(self.step, logged, now - t_start, self.step - start_step)
                self._check_tau_health(logged)
                self.last_metrics = logged
                window_t, window_units, steps_in_window = now, 0, 0
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.steps:
                self._evaluate()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                self._checkpoint(final=False)
        final = dict(self.last_metrics)
        final.update(self._evaluate())
        final["train_time_s"] = time.perf_counter() - t_start
        self.tracker.log_metrics({"train_time_s": final["train_time_s"]}, self.step)
        self._log_tau_histogram()
        self._checkpoint(final=True, metrics=final)
        self.tracker.flush(force=True)
        return final

    def _check_tau_health(self, metrics: dict[str, float]) -> None:
        """Warn (log + MLflow tag) when per-sample τ has not moved after warm-up or sits on a bound."""
        if self.tau_health is None or self.rank != 0:
            return
        for message in self.tau_health.check(self.step, metrics):
            logger.warning(message)
            self.tracker.set_tags({"tau_health": message[:5000]})

    def _log_tau_histogram(self) -> None:
        # Best-effort: the run has finished training; a plot must not turn it into a failure.
        try:
            log_tau_histogram(self.tracker, *self.task.tau_samples())
        except Exception as exc:  # noqa: BLE001
            logger.warning(f"τ histogram not logged ({type(exc).__name__}: {exc})")

    def _note_training_resumed(self) -> None:
        # For the kill → resumed measurement: the first optimizer step after a resume is done.
        now = time.time()
        self.tracker.log_metrics({"first_step_after_resume_unix": now}, self.step)
        if self.rank == 0:
            logger.info(
                f"training resumed: step {self.step} done {now - self.resumed_at:.1f}s "
                "after the checkpoint was loaded",
            )

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        # Losses are per-rank; τ/u statistics are already global (computed from gathered values),
        # averaging them again is harmless. One all-reduce for all keys, in a fixed order.
        # The metrics are device tensors accumulated without a sync: this is the one host sync.
        keys = sorted(metrics)
        t = torch.stack(
            [torch.as_tensor(metrics[k], dtype=torch.float64, device=self.device).reshape(()) for k in keys]
        )
        t = comm.all_reduce_sum(t) / self.world
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def _data_metrics(self) -> dict[str, float]:
        """Samples and shards lost to corrupt data (allow_corrupt), summed over ranks; warns once when
        the lost share exceeds data.warn_skipped_fraction."""
        counters = self.task.data_counters()
        keys = sorted(counters)
        values = torch.tensor([float(counters[k]) for k in keys], dtype=torch.float64, device=self.device)
        t = comm.all_reduce_sum(values)
        total = dict(zip(keys, t.tolist()))
        lost, read = total["skipped_samples"], total["skipped_samples"] + total["samples_seen"]
        limit = self.cfg.data.warn_skipped_fraction
        if lost and lost > limit * read and not self._warned_data:
            self._warned_data = True
            message = (
                f"{lost:.0f} of {read:.0f} training samples read so far ({lost / read:.1%}) were skipped "
                f"as corrupt, in {total['skipped_shards']:.0f} unreadable shard(s) (data.allow_corrupt; "
                f"warning above data.warn_skipped_fraction={limit}): check {self.cfg.data.path}"
            )
            if self.rank == 0:
                logger.warning(message)
            self.tracker.set_tags({"data_warning": message})
        return {names.SKIPPED_SAMPLES: lost, names.SKIPPED_SHARDS: total["skipped_shards"]}

    def _on_nonfinite(self) -> None:
        if self.rank == 0:
            logger.warning(
                f"step {self.step}: non-finite loss, step skipped ({self.nonfinite_skipped} so far)",
            )
        self.tracker.log_metrics({"nonfinite_skipped": float(self.nonfinite_skipped)}, self.step)
        if self.consecutive_nonfinite >= self.cfg.train.max_consecutive_nonfinite:
            self._checkpoint(final=False)
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive non-finite steps (train.max_consecutive_nonfinite="
                f"{self.cfg.train.max_consecutive_nonfinite}) at step {self.step}; a checkpoint was saved. "
                "Lower train.lr or check the data."
            )

    def _evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        results = self.task.evaluate(self.engine)
        if results:
            results["eval_time_s"] = time.perf_counter() - t0
            self.last_eval = dict(results)
            self.tracker.log_metrics(results, self.step)
            if self.rank == 0:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in results.items())
                logger.info(f"eval at step {self.step}: {shown}")
        return results

    def _checkpoint(self, final: bool, metrics: dict[str, float] | None = None) -> None:
        if self.step == self.resumed_step:
            # Nothing trained since the checkpoint we resumed from: saving again would only rewrite
            # (under Ray: re-register) the same step.
            return
        t0 = time.perf_counter()
        path = self.sink.save(
            self.engine,
            step=self.step,
            task_state=self.task.state(),
            config=self.cfg.to_dict(),
            metrics=metrics or {**self.last_metrics, **self.last_eval, "step": self.step},
            extra={
                "mlflow_run_id": self.tracker.resolved_run_id() if self.tracker.enabled else "",
                "tracking_uri": self.tracking_uri,
                "resume_count": self.resume_count,
                "final": final,
                "saved_unix": time.time(),
            },
        )
        seconds = time.perf_counter() - t0
        size = checkpoint_bytes(Path(path)) if self.rank == 0 and path and Path(path).is_dir() else 0
        if path:
            self.tracker.set_tags({"checkpoint_uri": path, "checkpoint_step": self.step})
        phases = {f"checkpoint_{k}": v for k, v in self.sink.last_timing.items()}
        self.tracker.log_metrics(
            {"checkpoint_save_s": seconds, "checkpoint_bytes": float(size), **phases}, self.step
        )
        if self.rank == 0:
            detail = ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in self.sink.last_timing.items())
            logger.info(
                f"checkpoint step {self.step} saved in {seconds:.2f}s"
                + (f" ({detail})" if detail else "")
                + f", {size / 2**20:.1f} MiB"
                + (f" → {path}" if path else ""),
            )


def _ray_node_ids() -> str:
    """The Ray node id of every rank, in rank order, comma-separated (where the workers were placed)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if not comm.is_distributed():
        return node
    ids: list[str] = [""] * comm.world_size()
    dist.all_gather_object(ids, node)
    return ",".join(ids)


def train_worker(spec: dict[str, Any] | WorkerSpec) -> dict[str, float]:
    """Entry point of every worker (Ray Train's train_loop_per_worker or a plain process)."""
    spec = spec if isinstance(spec, WorkerSpec) else WorkerSpec.from_dict(spec)
    configure_logging(int(os.environ.get("RANK", "0")))
    cfg = config_from_dict(spec.config)
    if spec.under_ray and cfg.ray.quiet:
        import logging

        # Ray Train logs every report (with all metrics) at INFO from a logger named after its file.
        import ray.train.v2._internal.execution.context as ray_train_context

        for name in ("ray.train", ray_train_context.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)
    if spec.standalone:
        # Without Ray there is no driver to build the demo data: rank 0 does, the others wait.
        init_distributed()
        if comm.rank() == 0:
            from dist_tempnet.data.prepare import prepare_data

            prepare_data(cfg)
        dist.barrier()
    sink = make_sink(cfg, spec)
    trainer = Trainer(cfg, spec, sink)
    final = trainer.fit()
    if not math.isfinite(final.get(names.LOSS, 0.0)):
        raise NonFiniteLossError(f"final loss is not finite: {final.get(names.LOSS)}")
    return final
