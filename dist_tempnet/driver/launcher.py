"""The driver: prepare data, open the MLflow run, run the workers with Ray Train, summarize.

Ray Train V2 (Ray 2.60): TorchTrainer starts `ray.num_workers` workers, sets up the torch process
group (gloo on CPU, NCCL on GPU) and calls `runtime.trainer.train_worker` with a `WorkerSpec` in
each. Without an address a local Ray is started; with `ray.address` (or RAY_ADDRESS) it joins that
cluster.

Failures and resumes:
- a worker that dies makes Ray Train restart the whole worker group (up to `ray.max_failures`
  times); the workers load the run's latest reported checkpoint and continue the same MLflow run;
- a new `train` whose `run.name` already has checkpoints stops before anything starts (it would
  otherwise silently continue that run: Ray resumes a run of the same name and storage by itself);
- `dist-tempnet train --resume X` (X: a checkpoint, a run directory or an MLflow run id) continues
  from that checkpoint with its own config plus the given overrides, under a fresh Ray run name so
  that Ray's own restore never substitutes another checkpoint for the chosen one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dist_tempnet import metric_names as names
from dist_tempnet.config import Config, ConfigError
from dist_tempnet.data.prepare import absolutize_paths, prepare_data, prepare_pretrained
from dist_tempnet.driver.preflight import preflight
from dist_tempnet.runtime import storage as remote
from dist_tempnet.runtime.spec import WorkerSpec
from dist_tempnet.runtime.tracking import bounded_http_env

logger = logging.getLogger(__name__)

# Forwarded to the workers (names only: see runtime.faults); written out here so the driver does not
# import torch just for them.
TEST_HOOK_ENV = ("DIST_TEMPNET_FAULT", "DIST_TEMPNET_SEEN_IDS")


@dataclass
class RunSummary:
    run_id: str
    tracking_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str = ""
    wall_time_s: float = 0.0
    note: str = ""  # set when nothing was run (e.g. a resume past train.steps)
    not_recorded: str = ""  # what MLflow did not get (and where it is kept), '' when it has everything

    def lines(self) -> list[str]:
        if self.note:
            return [self.note]
        m = self.metrics
        out = [f"MLflow run id: {self.run_id or '(tracking disabled)'}"]
        if self.tracking_uri:
            out.append(f"MLflow tracking URI: {self.tracking_uri}")
        if names.LOSS in m:
            out.append(f"final loss: {m[names.LOSS]:.4f}")
        if "eval/zero_shot_acc" in m:
            chance = m.get("eval/zero_shot_chance", float("nan"))
            out.append(f"zero-shot accuracy (held-out): {m['eval/zero_shot_acc']:.3f} (chance {chance:.3f})")
        for k in (
            "eval/i2t_recall_at_1",
            "eval/t2i_recall_at_1",
            "eval/ppl",
            "eval/ppl_tempnet",
            "eval/token_acc",
        ):
            if k in m:
                out.append(f"{k.removeprefix('eval/')}: {m[k]:.4f}")
        if self.checkpoint:
            out.append(f"checkpoint: {self.checkpoint}")
        out.append(f"wall time: {self.wall_time_s:.1f}s")
        if self.not_recorded:
            out.append(self.not_recorded)
        return out


def _quiet_ray() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Preemption watching is for spot clusters; locally it only logs an actor-restart error.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for name in ("ray", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _worker_env(cfg: Config, use_gpu: bool) -> dict[str, str]:
    env = {
        "DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(cfg.ray.cpus_per_worker),
        # Ray Train V2 re-routes print() through its logger, which then reaches the driver twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
        # Rank 0 logs synchronously: MLflow's default retries (7, exponential backoff) would stall
        # training for minutes per call while the server is down. The Tracker spools and replays.
        **bounded_http_env(),
    }
    for key in (
        *TEST_HOOK_ENV,
        "NCCL_DEBUG",
        "NCCL_SOCKET_IFNAME",
        "NCCL_IB_DISABLE",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        # Workers resolve hub ids in the same cache as the driver (HF_TOKEN is not copied into
        # Ray's runtime env, which the dashboard shows: nodes that must download need their own).
        "HF_HUB_OFFLINE",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_ENDPOINT",
        *remote.STORAGE_ENV,
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _is_jobs_api(address: str) -> bool:
    return address.startswith(("http://", "https://"))


def check_ray_address(cfg: Config) -> None:
    """`ray.address` must be an address `ray.init` can join, not a Jobs API URL (before anything starts)."""
    if _is_jobs_api(cfg.ray.address):
        raise ConfigError(
            f"ray.address={cfg.ray.address!r} is a Ray Jobs API (dashboard) URL; `train` joins a cluster "
            "through its GCS or client address (ray.address=HEAD:6379 or ray://HEAD:10001). To run the "
            f"job on that cluster through the Jobs API: dist-tempnet submit --address {cfg.ray.address} "
            "-- dist-tempnet train ..."
        )


def resolve_ray_address(cfg: Config) -> str:
    """The cluster `train` joins: `ray.address`, else RAY_ADDRESS, else '' (start a local Ray).

    RAY_ADDRESS also names a cluster's Jobs API (http(s)://head:8265), which `ray job` and
    `dist-tempnet submit` use and `ray.init` cannot join: such a value is ignored, with a log line."""
    check_ray_address(cfg)
    if cfg.ray.address:
        return cfg.ray.address
    env = os.environ.get("RAY_ADDRESS", "")
    if _is_jobs_api(env):
        logger.warning(
            f"RAY_ADDRESS={env} is a Ray Jobs API address (used by `dist-tempnet submit`), not one `train` "
            "can join: starting a local Ray instead. To run on that cluster: dist-tempnet submit -- "
            "dist-tempnet train ...; to join a cluster directly: ray.address=HEAD:6379 or ray://HEAD:10001"
        )
        return ""
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(**values: str | None):
    """Set (or, with None, remove) environment variables of this process for the block."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_ray(cfg: Config) -> bool:
    """Start or join Ray; return whether workers get GPUs."""
    import ray

    address = resolve_ray_address(cfg)
    if ray.is_initialized():
        pass
    elif address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        import torch

        need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
        # Ray's helpers that take no address (Ray Train's PlacementGroupCleaner actor polls the State
        # API) look for "the" local Ray and fail with "Found multiple active Ray instances" when
        # another one runs on this machine: the instance gets a known GCS port, and every process of
        # the job its address (the job's runtime env; fit_with_ray sets it in this process).
        own = f"127.0.0.1:{_free_port()}"
        # ray.init would read RAY_ADDRESS (e.g. a Jobs API URL) and try to join it.
        with _environ(RAY_ADDRESS=None, RAY_GCS_SERVER_PORT=own.rpartition(":")[2]):
            # "local": a new instance even where `ray start` left /tmp/ray/ray_current_cluster (ray.init
            # would otherwise join that cluster, and refuse num_cpus for it).
            ray.init(
                address="local",
                num_cpus=max(need, os.cpu_count() or 1),
                num_gpus=torch.cuda.device_count(),
                # The dashboard serves the State API that Ray Train's placement-group cleaner polls
                # (without it, it warns every few seconds) and the Jobs API.
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                logging_level=logging.WARNING,
                log_to_driver=True,
                configure_logging=True,
                runtime_env={"env_vars": {"RAY_ADDRESS": own}},
            )
    if cfg.ray.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.ray.use_gpu == "true"


def _checkpoint_config(cfg: Config):
    """Ray keeps `keep_last` checkpoints; with a best metric Ray ranks them by that metric instead
    of by age (Ray's own retention policy)."""
    from ray.train import CheckpointConfig

    c = cfg.checkpoint
    if not c.keep_best_metric:
        return CheckpointConfig(num_to_keep=c.keep_last)
    return CheckpointConfig(num_to_keep=c.keep_last, checkpoint_score_attribute=c.keep_best_metric,
                            checkpoint_score_order=c.keep_best_mode)  # fmt: skip


def fit_with_ray(cfg: Config, spec: WorkerSpec, ray_run_name: str = ""):
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dist_tempnet.runtime.trainer import train_worker

    use_gpu = _init_ray(cfg)
    storage_path, storage_fs = _ray_storage(cfg)
    resources = {"CPU": cfg.ray.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=spec.to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.ray.placement_strategy,
        ),
        run_config=RunConfig(
            name=ray_run_name or cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=_checkpoint_config(cfg),
            worker_runtime_env={"env_vars": _worker_env(cfg, use_gpu)},
            logging_config=LoggingConfig(log_level="WARNING" if cfg.ray.quiet else "INFO"),
        ),
    )
    # Ray's driver-side helpers without an address find this job's instance (see _init_ray).
    with _environ(RAY_ADDRESS=ray.get_runtime_context().gcs_address):
        return trainer.fit()


def _ray_storage(cfg: Config):
    """(storage_path, storage_filesystem) for Ray's RunConfig: `<output_dir>/ray`, on an object store
    when `run.output_dir` is a URI (Ray then uploads every checkpoint there, none stays local)."""
    if remote.is_uri(cfg.run.output_dir):
        return remote.filesystem(remote.join(cfg.run.output_dir, "ray"))[::-1]
    storage = Path(cfg.run.output_dir) / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    return str(storage), None


def _storage_exists(storage: str, name: str) -> bool:
    if remote.is_uri(storage):
        return remote.exists(remote.join(storage, name))
    return (Path(storage) / name).exists()


def ray_run_name(cfg: Config, storage: str | Path, manual_resume: bool) -> str:
    """`run.name`, except for a manual resume when a Ray run of that name exists: Ray would restore
    that run's latest checkpoint instead of the chosen one, so the resume gets `<name>-resume<k>`."""
    name = cfg.run.name
    if not manual_resume or not _storage_exists(str(storage), name):
        return name
    k = 1
    while _storage_exists(str(storage), f"{name}-resume{k}"):
        k += 1
    return f"{name}-resume{k}"


def _reopen_mlflow_run(cfg: Config, checkpoint: Path):
    """(uri, run_id, tracker, (status, end_time) it had) of the MLflow run a checkpoint belongs to,
    or None when it has none or it cannot be found (then a new run is created)."""
    from dist_tempnet.runtime.checkpoint import read_meta
    from dist_tempnet.runtime.tracking import Tracker, resolve_tracking_uri, spool_path

    meta = read_meta(checkpoint)
    run_id = meta.get("mlflow_run_id") or ""
    if not run_id:
        return None
    saved_cfg_uri = meta["config"]["mlflow"]["tracking_uri"]
    # An explicit mlflow.tracking_uri override wins over the URI the run used.
    explicit = cfg.mlflow.tracking_uri and cfg.mlflow.tracking_uri != saved_cfg_uri
    uri = resolve_tracking_uri(
        cfg.mlflow.tracking_uri if explicit else meta.get("tracking_uri") or saved_cfg_uri
    )
    tracker = Tracker(uri, run_id, spool=spool_path(cfg))
    try:
        info = tracker.client.get_run(run_id).info
        tracker.client.update_run(run_id, status="RUNNING")
    except Exception as exc:  # noqa: BLE001 - e.g. the run lives in another tracking store
        logger.warning(
            f"cannot reopen MLflow run {run_id} of {checkpoint} in {uri} "
            f"({type(exc).__name__}); starting a new MLflow run",
        )
        return None
    tracker.set_tags({"resumed_from_checkpoint": str(checkpoint)})
    return uri, run_id, tracker, (info.status, info.end_time)


def _open_tracking(cfg: Config, continuing: Path | None):
    """(tracking_uri, run_id, driver tracker, previous status) — the checkpoint's run when continuing
    one (with the (status, end_time) it had), else a new run (previous status None)."""
    if not cfg.mlflow.enabled:
        return "", "", None, None
    from dist_tempnet.runtime.tracking import PENDING_PREFIX, open_run

    reopened = _reopen_mlflow_run(cfg, continuing) if continuing else None
    if reopened:
        logger.info(f"continuing MLflow run {reopened[1]} ({reopened[0]})")
        return reopened
    tracker = open_run(cfg, cfg.ray.num_workers)
    if tracker.run_id.startswith(PENDING_PREFIX):
        logger.warning(
            f"MLflow at {tracker.tracking_uri} is unreachable: training starts anyway; the run is "
            f"created from {tracker.spool.path} when the server answers (or by `dist-tempnet mlflow-replay`)"
        )
    else:
        logger.info(f"MLflow run {tracker.run_id} ({tracker.tracking_uri})")
    return tracker.tracking_uri, tracker.run_id, tracker, None


def _close_failed(tracker, previous: tuple[str, int | None] | None, detail: str) -> None:
    """FAILED for a run this invocation created; a reopened run gets back the status it had: a resume
    that fails (e.g. on a corrupt checkpoint) must not turn a FINISHED run into a FAILED one."""
    if previous is None:
        tracker.terminate("FAILED", detail)
    elif previous[0] in ("FINISHED", "FAILED", "KILLED"):
        tracker.terminate(previous[0], end_time=previous[1])
    # else it was RUNNING (a crashed job continued by Ray) and stays so


def run_training(cfg: Config, use_ray: bool = True, resume_from: str | Path | None = None) -> RunSummary:
    """Run the whole job described by `cfg` and return what it achieved.

    `resume_from`: a checkpoint directory to continue from (see `config_for_resume` for its config).
    """
    from dist_tempnet.driver.resume import check_resume, refuse_existing_run, steps_left
    from dist_tempnet.runtime.checkpoint import read_meta

    t0 = time.perf_counter()
    # Bounded MLflow calls in the driver too (see runtime.tracking): never minutes of retries.
    os.environ.update(bounded_http_env())
    absolutize_paths(cfg)
    _quiet_ray()
    on_store = remote.is_uri(cfg.run.output_dir)
    if on_store and not use_ray:
        raise ConfigError(
            f"run.output_dir={cfg.run.output_dir!r} is an object store: without Ray checkpoints are written "
            "with plain file I/O to a shared path; run under Ray or give a local/shared directory"
        )
    storage = remote.join(cfg.run.output_dir, "ray") if on_store else Path(cfg.run.output_dir) / "ray"
    resume = Path(resume_from).resolve() if resume_from else None
    if use_ray:
        check_ray_address(cfg)
    if on_store and use_ray:
        # Fail here, with the URI and endpoint in the message, not in a worker's first upload.
        remote.check_writable(cfg.run.output_dir)
    # Run identity, before anything starts (data, MLflow, Ray).
    if resume is None:
        refuse_existing_run(cfg, use_ray)
    else:
        world = cfg.ray.num_workers if use_ray else int(os.environ.get("WORLD_SIZE", "1"))
        check_resume(cfg, resume, world)
        if steps_left(cfg, resume) <= 0:
            note = (
                f"nothing to train: checkpoint {resume} is at step {read_meta(resume)['step']} and "
                f"train.steps={cfg.train.steps}; pass a larger train.steps to continue it (MLflow untouched)"
            )
            logger.warning(note)
            return RunSummary("", "", checkpoint=str(resume), note=note)
    prepare_pretrained(cfg)  # hub downloads happen here, once, not in racing workers; fails fast
    prepare_data(cfg)
    preflight(cfg)  # before the MLflow run and Ray: bad inputs fail here, in seconds
    uri, run_id, tracker, previous_status = _open_tracking(cfg, resume)
    spec = WorkerSpec(
        cfg.to_dict(),
        tracking_uri=uri,
        mlflow_run_id=run_id,
        resume_from=str(resume) if resume else "",
        under_ray=use_ray,
    )
    try:
        if use_ray:
            result = fit_with_ray(cfg, spec, ray_run_name(cfg, storage, resume is not None))
            if getattr(result, "error", None):
                raise result.error
            metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
            checkpoint = result.checkpoint.path if result.checkpoint else ""
            if checkpoint and on_store:  # Ray reports the path inside the filesystem: put the scheme back
                checkpoint = f"{remote.scheme_of(cfg.run.output_dir)}://{checkpoint}"
        else:
            from dist_tempnet.runtime.trainer import train_worker

            metrics = train_worker(spec)
            checkpoint = ""
    except BaseException as exc:
        if tracker:
            _close_failed(tracker, previous_status, f"failed: {type(exc).__name__}: {exc}"[:1000])
            _report_not_recorded(tracker)
        raise
    not_recorded = ""
    if tracker:
        if checkpoint:
            tracker.set_tags({"checkpoint_uri": checkpoint})
        tracker.terminate("FINISHED", "finished")
        run_id = tracker.resolved_run_id()
        not_recorded = _report_not_recorded(tracker)
    return RunSummary(
        run_id, uri, metrics, str(checkpoint), time.perf_counter() - t0, not_recorded=not_recorded
    )


def _report_not_recorded(tracker) -> str:
    """Log (and return) the closing line about what MLflow did not get, if anything."""
    line = tracker.not_recorded()
    if line:
        logger.warning(line)
    return line


def print_summary(summary: RunSummary) -> None:
    print("\n".join(["", "=== dist-tempnet run finished ===", *summary.lines()]), file=sys.stdout, flush=True)
