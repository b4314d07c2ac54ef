"""Checkpoints: DeepSpeed engine state + one file per rank (task state, RNG) + metadata.

Layout of one checkpoint directory:

    deepspeed/<tag>/...     engine.save_checkpoint (model, optimizer, scheduler; per-rank shards)
    rank_<r>.pt             this rank's task state (DRO state shard, exact data position) and RNG states
    meta.json               step, world size, tag, config, metrics, MLflow run id and tracking URI
    files_rank_<r>.json     every file rank r wrote, with its size (written after them)
    COMPLETE                written by rank 0 after its own files

A directory counts as a checkpoint only when `is_complete` holds: COMPLETE, meta.json, and for each
of the `world_size` ranks its file list with every listed file present at the listed size. Under
Ray, ranks upload their files independently, so a rank killed mid-save leaves a directory that has
rank 0's COMPLETE but not the other lists: it is never loaded nor picked as the latest.

DeepSpeed keeps `client_state` for every rank only under ZeRO-3, hence our own rank files. ZeRO-1/2
optimizer state is saved in DeepSpeed's "elastic" layout (train.py turns it on), which DeepSpeed
re-partitions when a run resumes on another number of workers.

Two sinks. Under Ray Train V2 every rank saves into its own temporary directory and reports it
(`ray.train.report(..., checkpoint=Checkpoint.from_directory(d))`); Ray merges the ranks' files
into one persisted checkpoint and hands it back through `ray.train.get_checkpoint()` on restart.
Without Ray, checkpoints go to `<output_dir>/<run name>/checkpoints/step_<n>` on a shared path,
written under a temporary name and renamed once complete.

Fault injection for tests (`DIST_TEMPNET_FAULT`, see `FaultPlan`) lives here because both the loop
and the save path use it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dist_tempnet import comm
from dist_tempnet.config import Config

COMPLETE = "COMPLETE"
META = "meta.json"
FAULT_ENV = "DIST_TEMPNET_FAULT"  # launcher.TEST_HOOK_ENV forwards it to Ray workers


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- fault injection (tests) ------------------------------------------------------------------


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
}


@dataclass
class FaultPlan:
    """Faults a test asks for through `DIST_TEMPNET_FAULT="key=value,..."`:

    - `kill_rank=R,step=S`: rank R SIGKILLs itself right after optimizer step S (before any
      checkpoint of that step);
    - `crash_in_save_step=K`: every rank (or only `rank=R`) raises inside the save of step K, after
      DeepSpeed and the rank files are written but before the checkpoint is marked complete;
    - `nan_step=K`: the loss of step K is NaN; `nan_from_step=K`: every loss from step K on;
    - `once_file=PATH`: each fault fires once per rank (PATH.<fault>.rank<r> records it, with the
      time), so the restarted workers run clean.
    """

    kill_rank: int | None = None
    kill_step: int | None = None
    crash_in_save_step: int | None = None
    crash_rank: int | None = None
    nan_step: int | None = None
    nan_from_step: int | None = None
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
            print(f"[dist-tempnet] fault injection: SIGKILL rank {rank} after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def in_save(self, step: int, rank: int) -> None:
        if self.crash_in_save_step != step or self.crash_rank not in (None, rank):
            return
        if self._claim("crash_in_save", rank):
            raise InjectedFault(f"fault injection: crash inside the checkpoint save of step {step}")

    def poisons_loss(self, step: int) -> bool:
        return self.nan_step == step or (self.nan_from_step is not None and step >= self.nan_from_step)


# -- writing ----------------------------------------------------------------------------------


def _owner_of(name: str, world: int) -> int:
    """Which rank wrote a DeepSpeed file: ZeRO shards carry `zero_pp_rank_<r>_`, the rest is rank 0's."""
    for r in range(world):
        if f"zero_pp_rank_{r}_" in name:
            return r
    return 0


def _list_own_files(directory: Path, rank: int, world: int) -> dict[str, int]:
    files = {f"rank_{rank}.pt": (directory / f"rank_{rank}.pt").stat().st_size}
    if rank == 0:
        files[META] = (directory / META).stat().st_size
    ds_root = directory / "deepspeed"
    for path in sorted(p for p in ds_root.rglob("*") if p.is_file()):
        if _owner_of(path.name, world) == rank and not path.name.endswith(".tmp"):
            files[str(path.relative_to(directory))] = path.stat().st_size
    return files


def write_rank_files(
    directory: Path,
    engine,
    step: int,
    task_state: dict[str, Any],
    config: dict[str, Any],
    metrics: dict[str, float],
    extra: dict[str, Any],
    fault: FaultPlan | None = None,
) -> str:
    """Every rank calls this with its own (or a shared) directory; returns the DeepSpeed tag.

    The rank's file list is written last: until it exists the rank's part is not complete.
    """
    tag = f"step_{step:08d}"
    rank, world = comm.rank(), comm.world_size()
    engine.save_checkpoint(str(directory / "deepspeed"), tag=tag, save_latest=True)
    payload = {"task": task_state, "rng": rng_state(), "step": step, "rank": rank, "world_size": world}
    with tempfile.SpooledTemporaryFile() as buf:
        torch.save(payload, buf)
        buf.seek(0)
        _atomic_write_bytes(directory / f"rank_{rank}.pt", buf.read())
    if rank == 0:
        meta = {"step": step, "tag": tag, "world_size": world, "config": config, "metrics": metrics, **extra}
        _atomic_write_bytes(directory / META, json.dumps(meta, indent=1, default=str).encode())
    (fault or FaultPlan()).in_save(step, rank)
    files = _list_own_files(directory, rank, world)
    _atomic_write_bytes(directory / f"files_rank_{rank}.json", json.dumps(files, indent=1).encode())
    return tag


# -- reading ----------------------------------------------------------------------------------


def read_meta(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    meta_path = directory / META
    if not (directory / COMPLETE).is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint '{directory}' is incomplete (no {COMPLETE} marker or {META})")
    return json.loads(meta_path.read_text())


def missing_parts(directory: Path) -> list[str]:
    """What keeps `directory` from being a complete checkpoint (empty: it is complete)."""
    directory = Path(directory)
    try:
        meta = read_meta(directory)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        return [str(exc)]
    problems = []
    for rank in range(int(meta["world_size"])):
        listing = directory / f"files_rank_{rank}.json"
        if not listing.is_file():
            problems.append(f"{listing.name} (rank {rank} did not finish its save)")
            continue
        for rel, size in json.loads(listing.read_text()).items():
            path = directory / rel
            if not path.is_file():
                problems.append(f"{rel} (missing)")
            elif path.stat().st_size != size:
                problems.append(f"{rel} ({path.stat().st_size} bytes, expected {size})")
    return problems


def is_complete(directory: Path) -> bool:
    return Path(directory).is_dir() and not missing_parts(directory)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete `step_*` checkpoints directly under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if is_complete(p)), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def read_task_states(rank_files: list[Path]) -> list[dict[str, Any]]:
    """The `task` part of every old rank's file, in rank order (memory-mapped: every new rank reads
    all old shards but keeps only the rows it owns)."""
    return [torch.load(p, map_location="cpu", weights_only=False, mmap=True)["task"] for p in rank_files]


def _load_engine(directory: Path, meta: dict[str, Any], engine) -> None:
    old_world, world = int(meta["world_size"]), comm.world_size()
    stage = int(meta["config"]["deepspeed"]["zero_stage"])
    if old_world != world and stage == 3:
        raise RuntimeError(
            f"checkpoint '{directory}' was saved by {old_world} ZeRO-3 workers and this run has {world}: "
            "DeepSpeed 0.19.8 cannot re-partition ZeRO-3 state on load. Resume with "
            f"ray.num_workers={old_world}, or convert the checkpoint with DeepSpeed's ds_to_universal."
        )
    zero_1_2 = stage in (1, 2)
    # DeepSpeed 0.19.8's engine refuses ZeRO optimizer state saved at another data-parallel size and
    # its elastic-layout loader asserts a param-group "step" that torch's AdamW does not keep. So for
    # ZeRO-1/2 the engine loads module, scheduler and counters, and `_load_zero_1_2_state` the
    # optimizer state (re-partitioned with DeepSpeed's own routines; exact at any world size).
    load_path, _ = engine.load_checkpoint(
        str(directory / "deepspeed"),
        tag=meta["tag"],
        load_optimizer_states=not zero_1_2,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise FileNotFoundError(
            f"checkpoint '{directory}': DeepSpeed found no state under deepspeed/{meta['tag']}"
        )
    if zero_1_2:
        _load_zero_1_2_state(engine, directory / "deepspeed" / meta["tag"], old_world)


def _load_zero_1_2_state(engine, tag_dir: Path, old_world: int) -> None:
    """Load ZeRO-1/2 fp32 master weights and Adam moments saved by `old_world` ranks into this
    run's partitions (pinned DeepSpeed 0.19.8 internals)."""
    names = [tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(old_world)]
    states = [torch.load(n, map_location="cpu", weights_only=False)["optimizer_state_dict"] for n in names]
    optimizer = engine.optimizer
    if isinstance(states[0]["base_optimizer_state"], dict):  # saved without the elastic layout
        if old_world != comm.world_size():
            raise RuntimeError(
                f"{tag_dir}: optimizer state was saved without DeepSpeed's elastic_checkpoint layout, so "
                f"it cannot be re-partitioned; resume with ray.num_workers={old_world}"
            )
        optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        return
    optimizer._load_global_state(states[0])
    _restore_adam_partitions(optimizer, states)
    optimizer._restore_from_elastic_fp32_weights(states)
    optimizer._link_all_hp_params()
    # The base optimizer's param groups (with their current lr) were not loaded: take the lr the
    # restored scheduler computed last, or the first step after a resume would use the initial one.
    if engine.lr_scheduler is not None:
        for group, lr in zip(optimizer.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr


def _restore_adam_partitions(optimizer, states: list[dict[str, Any]]) -> None:
    # DeepSpeed's _restore_elastic_base_optimizer_state does this too, but asserts a param-group
    # "step" that torch's Adam keeps per parameter state instead.
    for i, group in enumerate(optimizer.optimizer.param_groups):
        flat = group["params"][0]
        saved = [sd["base_optimizer_state"][i] for sd in states]
        for key in saved[0]:
            values = [s[key] for s in saved]
            per_rank = all(
                torch.is_tensor(v) and v.shape == sd["single_partition_of_fp32_groups"][i].shape
                for v, sd in zip(values, states)
            )
            value = optimizer._partition_base_optimizer_state(key, values, i, is_partition_state=per_rank)
            if torch.is_tensor(value):
                value = value.detach().clone().to(flat.device if per_rank else value.device)
            optimizer.optimizer.state[flat][key] = value


def load_into(directory: Path, engine, task) -> dict[str, Any]:
    """Load a complete checkpoint directory into the engine and the task (all ranks).

    With another world size than the checkpoint's, DeepSpeed re-partitions the (elastic) ZeRO-1/2
    optimizer state, the task re-shards its DRO state and remaps its data position; RNG states are
    restored only for the same world size (they are per rank).
    """
    directory = Path(directory)
    problems = missing_parts(directory)
    if problems:
        raise FileNotFoundError(f"checkpoint '{directory}' is incomplete: {', '.join(problems[:5])}")
    meta = read_meta(directory)
    _load_engine(directory, meta, engine)
    old_world = int(meta["world_size"])
    rank_files = [directory / f"rank_{r}.pt" for r in range(old_world)]
    task.load_state(rank_files, old_world)
    own = directory / f"rank_{comm.rank()}.pt"
    if old_world == comm.world_size():
        set_rng_state(torch.load(own, weights_only=False)["rng"])
    return meta | {"path": str(directory)}


# -- sinks ------------------------------------------------------------------------------------


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

    def load_latest(self, engine, task) -> dict[str, Any] | None:
        raise NotImplementedError

    def _load_explicit(self, engine, task) -> dict[str, Any] | None:
        if self.resume_from is None:
            return None
        return load_into(self.resume_from, engine, task) | {"resume_kind": "manual"}


def retained_checkpoints(
    found: list[Path], keep_last: int, best_metric: str = "", mode: str = "max"
) -> set[Path]:
    """The newest `keep_last` checkpoints plus, with `best_metric`, the best one by that metric."""
    keep = set(found[-keep_last:])
    if best_metric:
        scored = []
        for path in found:
            value = read_meta(path).get("metrics", {}).get(best_metric)
            if isinstance(value, (int, float)) and value == value:
                scored.append((value if mode == "max" else -value, path.name, path))
        if scored:
            keep.add(max(scored)[2])
    return keep


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
        write_rank_files(staging, engine, step, task_state, config, metrics, extra, self.fault)
        _barrier()
        if comm.rank() == 0:
            (staging / COMPLETE).write_text(str(step))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            self._apply_retention()
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

    def load_latest(self, engine, task) -> dict[str, Any] | None:
        # Without Ray nothing restarts a run by itself: an explicit resume wins over the run's own.
        if self.resume_from is not None:
            return self._load_explicit(engine, task)
        found = self.complete_checkpoints()
        return load_into(found[-1], engine, task) | {"resume_kind": "restart"} if found else None


class RaySink(CheckpointSink):
    """Ray Train V2: per-rank temporary directories merged by Ray on report."""

    def __init__(self, resume_from: Path | None = None, fault: FaultPlan | None = None) -> None:
        self.resume_from = Path(resume_from) if resume_from else None
        self.fault = fault or FaultPlan()

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
        return str(storage.build_checkpoint_path_from_name(f"step_{step:08d}"))

    def load_latest(self, engine, task) -> dict[str, Any] | None:
        import ray.train

        # A fresh Ray run (launcher gives manual resumes a new Ray run name) has no checkpoint of
        # its own until its first report, so a non-None one means a restart after a failure.
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return self._load_explicit(engine, task)
        with checkpoint.as_directory() as d:
            return load_into(Path(d), engine, task) | {"resume_kind": "restart"}


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


def make_sink(cfg: Config, loop_config: dict[str, Any]) -> CheckpointSink:
    resume_from = loop_config.get("resume_from") or None
    fault = FaultPlan.from_env()
    if loop_config.get("ray"):
        return RaySink(resume_from, fault)
    root = Path(
        loop_config.get("checkpoint_root")
        or Path(cfg.run.output_dir).resolve() / cfg.run.name / "checkpoints"
    )
    return LocalSink(root, cfg.checkpoint.keep_last, resume_from, fault,
                     cfg.checkpoint.keep_best_metric, cfg.checkpoint.keep_best_mode)  # fmt: skip


# -- finding what to resume -------------------------------------------------------------------


def _checkpoint_in_dir(path: Path) -> Path:
    """A checkpoint directory, or the latest complete checkpoint of a run directory."""
    if (path / META).is_file() or (path / COMPLETE).is_file():
        problems = missing_parts(path)
        if problems:
            raise FileNotFoundError(f"checkpoint '{path}' is incomplete: {', '.join(problems[:5])}")
        return path
    for root in (path, path / "checkpoints"):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"'{path}' is neither a checkpoint (meta.json + COMPLETE) nor a run directory holding complete "
        "step_* checkpoints (a Ray run dir <output_dir>/ray/<name>, or <output_dir>/<name>/checkpoints)"
    )


def resolve_resume(spec: str, tracking_uri: str = "") -> Path:
    """`--resume` argument → checkpoint directory: a checkpoint dir, a run dir (its latest complete
    checkpoint), or an MLflow run id whose `checkpoint_uri` tag points at one of those."""
    path = Path(spec).expanduser()
    if path.exists():
        return _checkpoint_in_dir(path.resolve())
    from dist_tempnet.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(spec)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
        raise FileNotFoundError(
            f"--resume {spec!r}: no such checkpoint or run directory, and not an MLflow run id in {uri} "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    target = run.data.tags.get("checkpoint_uri", "")
    if not target:
        raise FileNotFoundError(
            f"--resume {spec!r}: the MLflow run has no 'checkpoint_uri' tag (never saved)"
        )
    target_path = Path(target.removeprefix("file://"))
    if not target_path.exists():
        raise FileNotFoundError(f"--resume {spec!r}: its checkpoint_uri {target} does not exist here")
    resolved = _checkpoint_in_dir(target_path)
    print(f"[dist-tempnet] MLflow run {spec} → checkpoint {resolved}", file=sys.stderr, flush=True)
    return resolved
