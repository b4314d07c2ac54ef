"""The per-worker training loop: one loop for every task.

A task (dist_tempnet.tasks) supplies the module DeepSpeed wraps, its parameter groups, the batch
stream, the forward step and evaluation; this file owns what is common: distributed setup, the
DeepSpeed engine, gradient accumulation, non-finite guards, logging, evaluation and checkpoints.

It runs under Ray Train (launcher.py) or on its own, one process per rank with the usual
torch.distributed environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which is
how it runs on a machine without Ray: `python -m dist_tempnet.train --config ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_tempnet import comm
from dist_tempnet.checkpoint import CheckpointSink, FaultPlan, checkpoint_bytes, make_sink
from dist_tempnet.config import Config, config_from_dict, load_config
from dist_tempnet.engine import build_engine, group_lrs
from dist_tempnet.tracking import Tracker

# Debugging/tests: a directory where every rank appends the sample ids of each micro batch it trains
# on (seen_rank<r>.jsonl), with a marker line at every resume.
SEEN_IDS_ENV = "DIST_TEMPNET_SEEN_IDS"


@dataclass
class StepResult:
    """What a task's forward returns: the loss to backprop and metrics to log (already global)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


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
        rate = metrics.get(f"{self.unit}_per_s", 0.0)
        eta = elapsed / max(1, steps_done) * (self.total - step)
        tau = metrics.get("tau/mean", metrics.get("tau/image_mean", float("nan")))
        print(
            f"[dist-tempnet] step {step}/{self.total} | loss {metrics.get('loss', float('nan')):.4f} | "
            f"tau {tau:.4f} | {rate:,.0f} {self.unit}/s | eta {_fmt_eta(eta)}",
            flush=True,
        )


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(comm.all_reduce_sum(t).item() > 0)


class Trainer:
    """Owns the engine and the loop; the task supplies everything task-specific."""

    def __init__(self, cfg: Config, loop_config: dict[str, Any], sink: CheckpointSink) -> None:
        self.cfg = cfg
        self.device = init_distributed()
        self.rank, self.world = comm.rank(), comm.world_size()
        seed_everything(cfg.run.seed)
        from dist_tempnet.tasks import build_task

        self.task = build_task(cfg, self.rank, self.world, self.device)
        self.engine = build_engine(self.task.module, self.task.param_groups(), cfg)
        if hasattr(self.task, "after_engine"):
            self.task.after_engine(self.engine)
        self.sink = sink
        self.fault = FaultPlan.from_env()
        self.tracking_uri = loop_config.get("tracking_uri", "")
        self.tracker = self._tracker(loop_config)
        self.step = 0
        self.resumed_step: int | None = None
        self.resume_count = 0
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self.last_metrics: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._resume()
        self.batches = self.task.batches()
        self.seen_log = SeenIdsLog.from_env(self.rank, self.world, self.device)
        if self.seen_log and self.resumed_step is not None:
            self.seen_log.mark_resume(self.resumed_step)

    def _tracker(self, loop_config: dict[str, Any]) -> Tracker:
        run_id = loop_config.get("mlflow_run_id") or ""
        if self.rank != 0 or not run_id:
            return Tracker.disabled()
        try:
            return Tracker(loop_config["tracking_uri"], run_id)
        except Exception as exc:  # noqa: BLE001 - e.g. mlflow not installed on a bare GPU box
            print(f"[dist-tempnet] MLflow disabled on rank 0: {exc}", file=sys.stderr)
            return Tracker.disabled()

    def _resume(self) -> None:
        meta = self.sink.load_latest(self.engine, self.task)
        if meta is None:
            return
        self.step = self.resumed_step = int(meta["step"])
        self.resumed_from = meta["path"]
        self.resumed_at = time.time()
        old_world = int(meta["world_size"])
        if self.rank == 0:
            print(
                f"[dist-tempnet] resumed ({meta.get('resume_kind', 'restart')}) from {meta['path']} at step "
                f"{self.step}"
                + (f", elastic: {old_world} → {self.world} workers" if old_world != self.world else ""),
                flush=True,
            )
            if old_world != self.world:
                self._announce_elastic(meta)
        self._log_resume(meta)

    def _announce_elastic(self, meta: dict[str, Any]) -> None:
        old_cfg = meta["config"]["train"]
        old_world = int(meta["world_size"])
        old_accum = old_cfg["global_batch_size"] // (old_world * old_cfg["micro_batch_size"])
        t = self.cfg.train
        print(
            f"[dist-tempnet] elastic resume: global batch {old_cfg['global_batch_size']} → "
            f"{t.global_batch_size}, gradient accumulation {old_accum} → "
            f"{self.engine.gradient_accumulation_steps()}; DRO state re-sharded, data position remapped "
            "(no sample of the epoch skipped or repeated)",
            flush=True,
        )
        if old_cfg["global_batch_size"] != t.global_batch_size:
            print(
                "[dist-tempnet] WARNING: train.global_batch_size differs from the checkpoint's: the "
                "optimization is not the one the interrupted run would have done",
                file=sys.stderr,
                flush=True,
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
        """Gradient-accumulated step; returns metrics, or None when it was skipped as non-finite."""
        engine, accum = self.engine, self.engine.gradient_accumulation_steps()
        step_metrics: dict[str, float] = {}
        units = 0
        skipped = False
        for micro in range(accum):
            batch = next(self.batches)
            if self.seen_log:
                self.seen_log.record(self.step + 1, micro, batch, self.batches)
            batch = to_device(batch, self.device)
            units += self.task.units(batch)
            result = self.task.forward(engine, batch)
            if self.fault.poisons_loss(self.step + 1):
                result.loss = result.loss * float("nan")
            bad = _any_rank(not bool(torch.isfinite(result.loss.detach()).all()), self.device)
            if bad:
                # Skip this micro batch's backward on every rank. engine.step() still runs so
                # DeepSpeed's micro-step counter stays aligned; with one micro batch per step the
                # optimizer sees no gradient and the step is a no-op apart from counters.
                skipped = True
                if accum == 1:
                    continue
                engine.step()
                continue
            engine.backward(result.loss)
            engine.step()
            for k, v in result.metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v / accum
        if skipped:
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
            print(
                f"[dist-tempnet] {cfg.run.task}/{cfg.loss.name}: {self.world} worker(s), "
                f"ZeRO-{cfg.deepspeed.zero_stage}, "
                f"{cfg.train.precision}, global batch {cfg.train.global_batch_size}, "
                f"accumulation {self.engine.gradient_accumulation_steps()}, {cfg.train.steps} steps",
                flush=True,
            )
        self.tracker.set_tags({"status_detail": "training", "world_size": self.world})
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
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                now = time.perf_counter()
                elapsed_window = now - window_t
                rate = window_units * self.world / max(elapsed_window, 1e-9)
                logged = self._reduce_metrics(metrics)
                logged.update(sched)
                logged.update({f"lr/{k}": v for k, v in group_lrs(self.engine).items()})
                logged[f"{self.task.unit}_per_s"] = rate
                logged[f"{self.task.unit}_per_s_per_worker"] = rate / self.world
                logged["nonfinite_skipped"] = float(self.nonfinite_skipped)
                self.tracker.log_metrics(logged, self.step)
                progress.show(self.step, logged, now - t_start, self.step - start_step)
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
        self.task.log_artifacts(self.tracker)
        self._checkpoint(final=True, metrics=final)
        self.tracker.flush(force=True)
        return final

    def _note_training_resumed(self) -> None:
        # For the kill → resumed measurement: the first optimizer step after a resume is done.
        now = time.time()
        self.tracker.log_metrics({"first_step_after_resume_unix": now}, self.step)
        if self.rank == 0:
            print(
                f"[dist-tempnet] training resumed: step {self.step} done {now - self.resumed_at:.1f}s "
                "after the checkpoint was loaded",
                flush=True,
            )

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        # Losses are per-rank; τ/u statistics are already global (computed from gathered values),
        # averaging them again is harmless. One all-reduce for all keys, in a fixed order.
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        t = comm.all_reduce_sum(t) / self.world
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def _on_nonfinite(self) -> None:
        if self.rank == 0:
            print(
                f"[dist-tempnet] step {self.step}: non-finite loss, step skipped "
                f"({self.nonfinite_skipped} so far)",
                file=sys.stderr,
                flush=True,
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
                print(f"[dist-tempnet] eval at step {self.step}: {shown}", flush=True)
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
                "mlflow_run_id": self.tracker.run_id or "",
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
            print(
                f"[dist-tempnet] checkpoint step {self.step} saved in {seconds:.2f}s"
                + (f" ({detail})" if detail else "")
                + f", {size / 2**20:.1f} MiB"
                + (f" → {path}" if path else ""),
                flush=True,
            )


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


def train_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    """Entry point of every worker (Ray Train's train_loop_per_worker or a plain process)."""
    cfg = config_from_dict(loop_config["config"])
    if loop_config.get("ray") and cfg.ray.quiet:
        import logging

        # Ray Train logs every report (with all metrics) at INFO from a logger named after its file.
        import ray.train.v2._internal.execution.context as ray_train_context

        for name in ("ray.train", ray_train_context.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)
    if loop_config.get("standalone"):
        # Without Ray there is no driver to build the demo data: rank 0 does, the others wait.
        init_distributed()
        if comm.rank() == 0:
            from dist_tempnet.launcher import prepare_data

            prepare_data(cfg)
        dist.barrier()
    sink = make_sink(cfg, loop_config)
    trainer = Trainer(cfg, loop_config, sink)
    final = trainer.fit()
    if not math.isfinite(final.get("loss", 0.0)):
        raise NonFiniteLossError(f"final loss is not finite: {final.get('loss')}")
    return final


def _terminate_run(loop_config: dict[str, Any], status: str) -> None:
    """Without Ray there is no driver to close the MLflow run: rank 0 does."""
    if loop_config.get("mlflow_run_id") and comm.rank() == 0:
        Tracker(loop_config["tracking_uri"], loop_config["mlflow_run_id"]).terminate(status)


def main(argv: list[str] | None = None) -> None:
    """Run one rank without Ray: `python -m dist_tempnet.train --config cfg.yaml key=value ...`.

    Launch it once per rank (torchrun, or by hand with RANK/WORLD_SIZE/MASTER_* set); with none of
    those set it trains as a world of one. MLflow is used when importable and enabled.
    """
    parser = argparse.ArgumentParser(prog="python -m dist_tempnet.train")
    parser.add_argument("--config", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from dist_tempnet.launcher import absolutize_paths

    absolutize_paths(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    loop_config: dict[str, Any] = {"config": cfg.to_dict(), "standalone": True}
    if cfg.mlflow.enabled and int(os.environ.get("RANK", "0")) == 0:
        try:
            from dist_tempnet.tracking import start_run

            loop_config["tracking_uri"], loop_config["mlflow_run_id"] = start_run(cfg, world)
        except ImportError as exc:
            print(f"[dist-tempnet] MLflow not available ({exc}); tracking disabled", file=sys.stderr)
    try:
        final = train_worker(loop_config)
    except BaseException:
        _terminate_run(loop_config, "FAILED")
        raise
    _terminate_run(loop_config, "FINISHED")
    if int(os.environ.get("RANK", "0")) == 0:
        print({k: round(v, 5) for k, v in final.items()})


if __name__ == "__main__":
    main()
