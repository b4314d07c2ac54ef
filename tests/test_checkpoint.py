"""Checkpoints without Ray: exact data position, atomic saves, crash inside a save, elastic resume
(4 → 2 → 1 workers), the non-finite guard, MLflow unreachable mid-run, export of what we save.

Multi-process tests run the real Trainer (DeepSpeed ZeRO-2, gloo) through tests/_dist.py with the
LocalSink; the Ray path is in tests/test_fault_tolerance.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dist_tempnet.config import load_config
from dist_tempnet.data import clip_batches, load_text_tokenizer, make_demo_clip_dataset, resolve_manifest
from dist_tempnet.data.resume import resume_position
from tests._dist import run_distributed

NUM_TRAIN, SHARD, IMAGE = 128, 16, 16  # 8 shards: 1, 2 and 4 ranks all get whole shards
GLOBAL_BATCH = 16  # 8 optimizer steps per epoch


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt_data") / "clip"
    return make_demo_clip_dataset(
        root, num_train=NUM_TRAIN, num_eval=16, image_size=IMAGE, samples_per_shard=SHARD, seed=0
    )


def tiny_overrides(
    data: Path, world: int, steps: int, micro: int = 4, extra: list[str] | None = None
) -> list[str]:
    return [
        f"data.path={data}",
        "data.demo=false",
        f"data.image_size={IMAGE}",
        "data.shuffle_buffer=32",
        "loss.name=isogclr_tempnet",
        "deepspeed.zero_stage=2",
        f"ray.num_workers={world}",
        f"train.global_batch_size={GLOBAL_BATCH}",
        f"train.micro_batch_size={micro}",
        f"train.steps={steps}",
        "train.warmup_steps=1",
        "train.log_every=1",
        "checkpoint.every=2",
        "checkpoint.keep_last=5",
        "eval.max_batches=1",
        "eval.zero_shot=false",
        "mlflow.enabled=false",
        "run.seed=0",
        *(extra or []),
    ]


# ------------------------------------------------------------------------------- data position


def _ids(stream, n: int) -> list[list[int]]:
    return [next(stream)["sample_ids"].tolist() for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_world_resume_replays_exactly(clip_data, num_workers):
    manifest = resolve_manifest(clip_data, "train")
    tok = load_text_tokenizer(clip_data / "tokenizer.json")

    def stream(resume=None):
        return clip_batches(
            manifest,
            batch_size=8,
            tokenizer=tok,
            num_workers=num_workers,
            shuffle_buffer=32,
            seed=3,
            resume=resume,
        )

    with stream() as s:
        uninterrupted = _ids(s, 40)  # 2.5 epochs
    with stream() as s:
        before = _ids(s, 21)  # stops mid epoch 1, with batches straddling the epoch boundary
        position = s.position_state()
    with stream(resume_position([position], manifest, 0, 1, num_workers)) as s:
        after = _ids(s, 19)
    assert before + after == uninterrupted


def test_elastic_data_position_sees_every_sample_once(clip_data):
    manifest = resolve_manifest(clip_data, "train")
    tok = load_text_tokenizer(clip_data / "tokenizer.json")
    seen: dict[int, list[int]] = {}

    def run(stream, n):
        with stream:
            for _ in range(n):
                batch = next(stream)
                for i, e in zip(batch["sample_ids"].tolist(), stream.last_sample_epochs):
                    seen.setdefault(e, []).append(i)
            return stream.position_state()

    def stream(rank, world, resume=None):
        return clip_batches(
            manifest,
            batch_size=4,
            rank=rank,
            world_size=world,
            tokenizer=tok,
            shuffle_buffer=16,
            seed=1,
            resume=resume,
        )

    # 4 ranks at different depths (rank 3 is already in epoch 1), then 2, then 1.
    states4 = [run(stream(r, 4), n) for r, n in enumerate((3, 5, 2, 9))]
    states2 = [run(stream(r, 2, resume_position(states4, manifest, r, 2, 0)), 7) for r in range(2)]
    run(stream(0, 1, resume_position(states2, manifest, 0, 1, 0)), 60)
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == list(range(NUM_TRAIN)), f"epoch {epoch} not seen exactly once"


# ------------------------------------------------------------------------- the Trainer, no Ray


def _trainer_worker(
    rank: int, world: int, data: str, root: str, steps: int, micro: int, env: dict, extra: list[str]
) -> dict:
    """Build a Trainer (resuming from `root` if it holds a checkpoint), then fit; returns what the
    tests compare: the step it resumed at, the DRO shard and fp32 master weights after loading and at
    the end. With `resave` in env, the engine state right after loading is saved there again (to
    compare the re-partitioned optimizer state with the saved one)."""
    os.environ.update(env)
    from deepspeed.utils import safe_get_full_fp32_param

    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.faults import FaultPlan
    from dist_tempnet.runtime.trainer import Trainer

    cfg = load_config(None, tiny_overrides(Path(data), world, steps, micro, extra))
    trainer = Trainer(cfg, None, LocalSink(Path(root), cfg.checkpoint.keep_last, fault=FaultPlan.from_env()))

    def snapshot():
        return {n: safe_get_full_fp32_param(p).clone() for n, p in trainer.engine.module.named_parameters()}

    out = {"resumed_step": trainer.resumed_step, "dro_loaded": trainer.task.loss_fn.dro_state.state_dict()}
    out["loaded"] = snapshot() if trainer.resumed_step is not None else None
    if env.get("resave"):
        trainer.engine.save_checkpoint(env["resave"], tag="reloaded")
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - the guard test inspects it
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["final"] = snapshot()
    out["dro_final"] = trainer.task.loss_fn.dro_state.state_dict()
    out["step"] = trainer.step
    return out


def _train(world, data, root, steps, micro=4, env=None, extra=None, timeout=420):
    env = {"DS_ACCELERATOR": "cpu", **(env or {})}
    return run_distributed(
        _trainer_worker, world, str(data), str(root), steps, micro, env, extra or [], timeout=timeout
    )


def _dro_table(states: list[dict]) -> dict[str, torch.Tensor]:
    from dist_tempnet.dro_state import DROState

    full = DROState.from_shard_states(states, 0, 1)
    return {name: full.field(name).clone() for name in full.fields} | {"visited": full.visited.clone()}


def _full_adam_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every param group's Adam moments and fp32 master weights, unpartitioned (ZeRO-2: each rank
    holds one slice of each group's flat vector, zero-padded at the end to a multiple of the world
    size)."""
    files = sorted(
        tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=lambda p: int(p.name.split("_")[3])
    )
    states = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    full = {}
    for group in range(len(states[0]["single_partition_of_fp32_groups"])):
        full[f"fp32/{group}"] = torch.cat([s["single_partition_of_fp32_groups"][group] for s in states])
        for key in ("exp_avg", "exp_avg_sq"):
            full[f"{key}/{group}"] = torch.cat(
                [s["base_optimizer_state"]["state"][group][key] for s in states]
            )
    return full


def _same_up_to_padding(a: torch.Tensor, b: torch.Tensor) -> bool:
    n = min(len(a), len(b))
    return torch.equal(a[:n], b[:n]) and not a[n:].any() and not b[n:].any()


def _assert_same_dro(a: list[dict], b: list[dict]) -> None:
    ta, tb = _dro_table(a), _dro_table(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), f"DRO field {name} differs"


@pytest.mark.multiproc
def test_elastic_resume_4_to_2_to_1(clip_data, tmp_path):
    """Save on 4 workers, resume on 2, then on 1: the DRO state (union of shards) and the model and
    optimizer state survive re-sharding; every sample of the interrupted epoch is trained on once."""
    root, seen = tmp_path / "ckpt", tmp_path / "seen"
    env = {"DIST_TEMPNET_SEEN_IDS": str(seen)}
    four = _train(4, clip_data, root, steps=3, micro=4, env=env)
    two = _train(2, clip_data, root, steps=5, micro=4, env=env | {"resave": str(tmp_path / "resaved")})
    one = _train(1, clip_data, root, steps=8, micro=8, env=env)  # accumulation 2 → 2 (micro 8)
    assert [r["resumed_step"] for r in two] == [3, 3] and one[0]["resumed_step"] == 5
    _assert_same_dro([r["dro_final"] for r in four], [r["dro_loaded"] for r in two])
    _assert_same_dro([r["dro_final"] for r in two], [r["dro_loaded"] for r in one])
    for before, after in ((four[0]["final"], two[0]["loaded"]), (two[0]["final"], one[0]["loaded"])):
        for name, value in before.items():
            assert torch.equal(value, after[name]), name
    saved = _full_adam_state(root / "step_00000003" / "deepspeed" / "step_00000003")
    reloaded = _full_adam_state(tmp_path / "resaved" / "reloaded")
    assert saved.keys() == reloaded.keys()
    for key in saved:
        assert _same_up_to_padding(saved[key], reloaded[key]), (
            f"optimizer state {key} not re-partitioned exactly"
        )
    from dist_tempnet.runtime.faults import seen_ids_by_epoch

    by_epoch = seen_ids_by_epoch(seen)
    assert sorted(by_epoch[0]) == list(range(NUM_TRAIN)), "epoch 0: a sample was skipped or repeated"
    assert set(by_epoch) == {0}

    # `dist-tempnet export` consolidates what we save (ZeRO-2).
    from dist_tempnet.runtime.export import export_checkpoint, load_tempnets

    exported = export_checkpoint(root / "step_00000008", tmp_path / "export")
    tempnet = load_tempnets(exported)["image"].state_dict()
    final = one[0]["final"]
    for name, value in tempnet.items():
        assert torch.equal(value, final[f"loss_fn.image_tempnet.{name}"]), name


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")
    }


@pytest.mark.multiproc
def test_elastic_resume_zero3_through_universal_checkpoint(clip_data, tmp_path):
    """ZeRO-3 partitions parameters too: 2 workers → 1 goes through DeepSpeed's universal format.
    Weights, TempNet and DRO state arrive exactly, and the checkpoint itself is left untouched."""
    root = tmp_path / "ckpt"
    extra = ["deepspeed.zero_stage=3"]
    two = _train(2, clip_data, root, steps=2, micro=4, extra=extra)
    checkpoint = root / "step_00000002"
    before = _listing(checkpoint)
    one = _train(1, clip_data, root, steps=3, micro=8, extra=extra)
    assert one[0]["resumed_step"] == 2 and "error" not in one[0], one[0].get("error")
    for name, value in two[0]["final"].items():
        assert torch.equal(value, one[0]["loaded"][name]), name
    _assert_same_dro([r["dro_final"] for r in two], [r["dro_loaded"] for r in one])
    assert _listing(checkpoint) == before, "the resumed-from checkpoint was modified"


def test_optimizer_state_follows_its_parameter_device():
    """After a restore, state tensors live where their parameter lives (torch's fused AdamW on CUDA
    refuses CPU state); `step` moves only for fused/capturable groups, as in torch's own loading.
    The CUDA case is emulated with parameters on the meta device."""
    from dist_tempnet.runtime.checkpoint import align_optimizer_state

    fused_param = torch.nn.Parameter(torch.zeros(3, device="meta"))
    plain_param = torch.nn.Parameter(torch.zeros(3, device="meta"))
    opt = torch.optim.SGD([{"params": [fused_param], "fused": True}, {"params": [plain_param]}], lr=0.1)
    for p in (fused_param, plain_param):
        opt.state[p] = {"step": torch.tensor(4.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)}
    align_optimizer_state(opt)
    assert {v.device.type for v in opt.state[fused_param].values()} == {"meta"}
    assert opt.state[plain_param]["exp_avg"].device.type == "meta"
    assert opt.state[plain_param]["step"].device.type == "cpu"


# ------------------------------------------------------------------- atomicity and completeness


class _FakeEngine:
    """Writes files shaped like a ZeRO-2 save of rank 0 (no DeepSpeed needed)."""

    def save_checkpoint(self, directory: str, tag: str, save_latest: bool) -> None:
        d = Path(directory) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 50)
        (Path(directory) / "latest").write_text(tag)


def _save(sink, step: int) -> str:
    return sink.save(
        _FakeEngine(), step, {"data": None}, {"deepspeed": {"zero_stage": 2}}, {"step": step}, {}
    )


def test_crash_inside_save_never_leaves_a_complete_or_latest_checkpoint(tmp_path):
    from dist_tempnet.runtime.checkpoint import LocalSink, latest_checkpoint
    from dist_tempnet.runtime.faults import FaultPlan, InjectedFault

    sink = LocalSink(tmp_path, keep_last=2, fault=FaultPlan(crash_in_save_step=4))
    _save(sink, 2)
    with pytest.raises(InjectedFault):
        _save(sink, 4)
    staged = tmp_path / ".tmp-step_00000004"
    assert (staged / "deepspeed" / "step_00000004").is_dir() and not (staged / "COMPLETE").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000002"
    for step in (6, 8, 10):
        _save(sink, step)
    assert [p.name for p in sink.complete_checkpoints()] == ["step_00000008", "step_00000010"]
    assert not staged.exists(), "staging directories of crashed saves are cleaned up"


def test_partial_multi_rank_checkpoint_is_incomplete(tmp_path):
    """What Ray leaves when rank 1 dies mid-save: rank 0's files (with COMPLETE) but not rank 1's."""
    from dist_tempnet.runtime.checkpoint import LocalSink, is_complete, latest_checkpoint, missing_parts

    sink = LocalSink(tmp_path, keep_last=5)
    good = Path(_save(sink, 2))
    partial = Path(_save(sink, 4))
    meta = json.loads((partial / "meta.json").read_text())
    (partial / "meta.json").write_text(json.dumps(meta | {"world_size": 2}))
    (partial / "files_rank_0.json").write_text(  # keep rank 0's list consistent with the edited meta
        json.dumps(json.loads((partial / "files_rank_0.json").read_text()) | {"meta.json": 0})
    )
    assert not is_complete(partial) and any("files_rank_1.json" in m for m in missing_parts(partial))
    assert latest_checkpoint(tmp_path) == good
    shard = good / "deepspeed" / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"o" * 10)  # truncated upload
    assert any("expected 50" in m for m in missing_parts(good)) and latest_checkpoint(tmp_path) is None


def test_fault_plan_from_env_fires_once(tmp_path, monkeypatch):
    from dist_tempnet.runtime.faults import FAULT_ENV, FaultPlan, InjectedFault

    monkeypatch.setenv(FAULT_ENV, f"crash_in_save_step=3,rank=1,nan_from_step=7,once_file={tmp_path / 'x'}")
    plan = FaultPlan.from_env()
    plan.in_save(3, 0)  # another rank: no fault
    with pytest.raises(InjectedFault):
        plan.in_save(3, 1)
    plan.in_save(3, 1)  # once
    assert (tmp_path / "x.crash_in_save.rank1").is_file()
    assert not plan.poisons_loss(6) and plan.poisons_loss(7) and plan.poisons_loss(9)
    monkeypatch.setenv(FAULT_ENV, "kil_rank=1")
    with pytest.raises(ValueError, match="unknown keys"):
        FaultPlan.from_env()


def test_resolve_resume_forms(tmp_path):
    from mlflow.tracking import MlflowClient

    from dist_tempnet.driver.resume import resolve_resume
    from dist_tempnet.runtime.checkpoint import LocalSink

    run_dir = tmp_path / "ray" / "job"
    sink = LocalSink(run_dir, keep_last=5)
    first, second = Path(_save(sink, 2)), Path(_save(sink, 4))
    assert resolve_resume(str(first)) == first
    assert resolve_resume(str(run_dir)) == second
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("resume"))
    client.set_tag(run.info.run_id, "checkpoint_uri", str(first))
    assert resolve_resume(run.info.run_id, uri) == first
    with pytest.raises(FileNotFoundError, match="not an MLflow run id"):
        resolve_resume("no-such-run", uri)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_resume(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------- guards


def _guard_worker(
    rank: int, world: int, data: str, root: str, tracking_uri: str, run_id: str, dead_uri: str
) -> dict:
    """fit() with MLflow pointed at a dead server from step 3 on; then a run whose loss turns NaN."""
    import logging

    os.environ.update(
        {"DS_ACCELERATOR": "cpu", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    )
    from mlflow.tracking import MlflowClient

    from dist_tempnet.runtime.checkpoint import LocalSink
    from dist_tempnet.runtime.faults import FaultPlan
    from dist_tempnet.runtime.spec import WorkerSpec
    from dist_tempnet.runtime.trainer import NonFiniteLossError, Trainer

    out: dict = {}
    # run.output_dir: the MLflow spool of the calls that fail goes there (not into the working directory).
    extra = ["checkpoint.every=0", f"run.output_dir={root}"]
    cfg = load_config(None, tiny_overrides(Path(data), 1, 5, micro=16, extra=extra))
    spec = WorkerSpec(cfg.to_dict(), tracking_uri=tracking_uri, mlflow_run_id=run_id)
    trainer = Trainer(cfg, spec, LocalSink(Path(root) / "a", 2))
    before_step = trainer.task.before_step

    def server_dies_at_step_3(step: int):
        if step == 2:  # before the third step
            trainer.tracker.client = MlflowClient(tracking_uri=dead_uri)
        return before_step(step)

    trainer.task.before_step = server_dies_at_step_3
    caught: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = caught.append
    logging.getLogger("dist_tempnet.runtime.tracking").addHandler(handler)
    out["final"] = trainer.fit()
    out["warnings"] = [
        r.getMessage() for r in caught if r.levelno == logging.WARNING and "MLflow" in r.getMessage()
    ]
    out["pending"] = trainer.tracker.pending

    os.environ["DIST_TEMPNET_FAULT"] = "nan_from_step=3"
    cfg = load_config(
        None, tiny_overrides(Path(data), 1, 8, micro=16, extra=["train.max_consecutive_nonfinite=2"])
    )
    trainer = Trainer(cfg, None, LocalSink(Path(root) / "b", 2, fault=FaultPlan.from_env()))
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    out["nan_error"], out["nan_step"] = str(info.value), trainer.step
    return out


@pytest.mark.multiproc
def test_mlflow_down_mid_run_and_nonfinite_guard(clip_data, tmp_path):
    import socket

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("guards")).info.run_id
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    (out,) = run_distributed(_guard_worker, 1, str(clip_data), str(tmp_path), uri, run_id, dead, timeout=300)
    assert out["final"]["train_time_s"] > 0 and out["warnings"], "training completes and warns"
    assert out["pending"] > 0, "metrics logged while the server was down stay buffered"
    assert sorted(m.step for m in client.get_metric_history(run_id, "batch/loss")) == [1, 2]
    assert "2 consecutive non-finite steps" in out["nan_error"] and out["nan_step"] == 4
    from dist_tempnet.runtime.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "b").name == "step_00000004", "a checkpoint is saved before stopping"


def test_retention_keeps_last_k_plus_best(tmp_path):
    import json as _json

    from dist_tempnet.runtime.checkpoint import COMPLETE, retained_checkpoints

    found = []
    for step, acc in [(2, 0.1), (4, 0.9), (6, 0.3), (8, float("nan")), (10, 0.2)]:
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / COMPLETE).write_text("")
        (d / "meta.json").write_text(_json.dumps({"step": step, "metrics": {"eval/acc": acc}}))
        found.append(d)
    assert retained_checkpoints(found, 2) == set(found[-2:])
    assert retained_checkpoints(found, 2, "eval/acc", "max") == set(found[-2:]) | {found[1]}
    assert retained_checkpoints(found, 1, "eval/acc", "min") == {found[-1], found[0]}
