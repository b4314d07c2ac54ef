"""What a CUDA/bf16 run would get, pinned on CPU (DESIGN §10): DeepSpeed config, fp32 TempNet math
under a bf16 engine, offload refusal, no host syncs in the hot loop."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_tempnet.config import ConfigError, load_config
from dist_tempnet.runtime.engine import deepspeed_config
from dist_tempnet.tempnet import CLIPTempNet, LMTempNet
from tests._dist import run_distributed

NO_DATA = "data.path=/nonexistent/dist_tempnet_gpu_test"
ONE = ["ray.num_workers=1", "train.micro_batch_size=4", "train.global_batch_size=4", NO_DATA]


def _ds_config(overrides: list[str]) -> dict:
    return deepspeed_config(load_config(None, ONE + overrides), world_size=1)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_accumulates_and_reduces_gradients_in_fp32(stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    conf = _ds_config(["train.precision=bf16", f"deepspeed.zero_stage={stage}"])
    assert conf["data_types"]["grad_accum_dtype"] == "fp32"
    assert conf["communication_data_type"] == "fp32"
    # DeepSpeed 0.19.8 reads the keys where we put them (a misspelt key would be ignored silently).
    parsed = DeepSpeedConfig(conf)
    assert parsed.grad_accum_dtype == "fp32" and parsed.communication_data_type == torch.float32
    # fp32 runs need none of it.
    assert "data_types" not in _ds_config(["train.precision=fp32", f"deepspeed.zero_stage={stage}"])


def test_overlap_comm_follows_deepspeed_default_on_zero3():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z3 = DeepSpeedZeroConfig(**_ds_config(["deepspeed.zero_stage=3"])["zero_optimization"])
    z2 = DeepSpeedZeroConfig(**_ds_config(["deepspeed.zero_stage=2"])["zero_optimization"])
    assert z3.overlap_comm is True and z2.overlap_comm is False
    forced = _ds_config(["deepspeed.zero_stage=3", "deepspeed.overlap_comm=false"])
    assert forced["zero_optimization"]["overlap_comm"] is False


# -- TempNet under a bf16 engine -----------------------------------------------------------------


class _TauModule(nn.Module):
    """A bf16 'backbone' (one Linear) plus both TempNets, wrapped by a real DeepSpeed bf16 engine."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(16, 16)
        self.clip_tempnet = CLIPTempNet(16, num_prototypes=32, tau_min=0.005, tau_max=0.05)
        self.lm_tempnet = LMTempNet(16, hidden_size=32, tau_min=0.01, tau_max=1.5, dropout=0.0)

    def forward(self, x: torch.Tensor):
        feats = nn.functional.normalize(self.backbone(x.to(self.backbone.weight.dtype)).float(), dim=-1)
        tau = self.clip_tempnet(feats)
        return (feats.sum(-1) * tau).mean() + tau.mean(), tau


def _bf16_engine_tau(rank: int, world: int) -> dict:
    from dist_tempnet.runtime.engine import build_engine
    from dist_tempnet.tasks.base import ParamGroup

    os.environ["LOCAL_RANK"] = str(rank)
    cfg = load_config(None, ONE + ["train.precision=bf16", "deepspeed.zero_stage=2"])
    module = _TauModule()
    tempnet = [*module.clip_tempnet.parameters(), *module.lm_tempnet.parameters()]
    groups = [ParamGroup("model", list(module.backbone.parameters())), ParamGroup("tempnet", tempnet)]
    engine = build_engine(module, groups, cfg)
    # Distinct inputs whose τ differ by less than bf16's spacing near τ (≈1e-4 at 0.03; at init τ sits
    # near its midpoint, DESIGN §11): an fp32 TempNet tells them apart, a bf16 one returns a handful
    # of values.
    gen = torch.Generator().manual_seed(1)
    feats = nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=-1)
    logits = torch.randn(64, 16, generator=gen)
    with torch.no_grad():
        clip_tau = engine.module.clip_tempnet(feats.bfloat16())
        lm_tau = engine.module.lm_tempnet(logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = engine.module.clip_tempnet(feats)
    loss, _ = engine(torch.randn(4, 16))
    engine.backward(loss)
    engine.step()
    return {
        "param_dtype": engine.module.backbone.weight.dtype,
        "clip_tau": clip_tau,
        "lm_tau": lm_tau,
        "autocast_tau": under_autocast,
        "loss_finite": bool(torch.isfinite(loss)),
    }


@pytest.mark.slow
def test_tempnet_math_is_fp32_under_a_bf16_engine():
    (out,) = run_distributed(_bf16_engine_tau, 1, timeout=240)
    assert out["param_dtype"] == torch.bfloat16  # the engine really is bf16
    for key in ("clip_tau", "lm_tau", "autocast_tau"):
        tau = out[key]
        assert tau.dtype == torch.float32, key
        # Not quantized: (almost) every input gets its own τ.
        assert torch.unique(tau).numel() >= 48, (key, torch.unique(tau).numel())
    assert out["loss_finite"]


def test_optimizer_offload_is_refused_before_workers_start():
    with pytest.raises(ConfigError, match="deepspeed.offload_optimizer: true is not supported.*CPU Adam"):
        load_config(None, ONE + ["deepspeed.offload_optimizer=true"])


def test_training_forward_builds_no_kv_cache():
    from dist_tempnet.models.lm import build_causal_lm
    from dist_tempnet.tasks.lm import final_hidden

    lm = build_causal_lm("llama_tiny", vocab_size=64)
    assert lm.config.use_cache  # the model's default would build a cache on every forward
    seen = []
    lm.base_model.register_forward_hook(lambda m, args, kwargs, out: seen.append(out), with_kwargs=True)
    final_hidden(lm, torch.randint(0, 64, (2, 8)))
    assert seen and seen[0].past_key_values is None


# -- no host sync in the hot loop -----------------------------------------------------------------


def _caller() -> str:
    code = sys._getframe(2).f_code
    return f"{Path(code.co_filename).name}:{code.co_name}"


class HostSyncCounter:
    """Counts the tensor→host reads that stall an accelerator's queue: .item(), float/int/bool(t),
    .tolist(), .cpu(), boolean-mask indexing, torch.unique. On CPU they are cheap but the same calls
    happen, so counting them here pins what a CUDA run would do."""

    _METHODS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.where: list[str] = []  # file:function of each call
        self._saved: dict[str, object] = {}

    def _wrap(self, name: str, original):
        def counted(t, *args, **kwargs):
            self.calls.append(name)
            self.where.append(_caller())
            return original(t, *args, **kwargs)

        return counted

    def _getitem(self, original):
        def getitem(t, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.calls.append("bool-mask index")
                self.where.append(_caller())
            return original(t, index)

        return getitem

    def __enter__(self) -> HostSyncCounter:
        for name in (*self._METHODS, "__getitem__"):
            self._saved[name] = getattr(torch.Tensor, name)
        for name in self._METHODS:
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))
        torch.Tensor.__getitem__ = self._getitem(self._saved["__getitem__"])
        self._saved["unique"] = torch.unique
        torch.unique = self._wrap("torch.unique", self._saved["unique"])
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            if name == "unique":
                torch.unique = original
            else:
                setattr(torch.Tensor, name, original)


def _accumulate(total: dict, metrics: dict, accum: int) -> None:
    # What Trainer.train_step does with each micro-step's metrics.
    for k, v in metrics.items():
        total[k] = total.get(k, 0.0) + v / accum


def test_lm_micro_steps_make_no_host_sync():
    from dist_tempnet.models.lm import build_causal_lm
    from dist_tempnet.tasks.lm import LMTrainModule, lm_step_metrics

    torch.manual_seed(0)
    lm = build_causal_lm("llama_tiny", vocab_size=64)
    module = LMTrainModule(lm, LMTempNet(64, hidden_size=16), "tempnet", 7.0, 16, frozen_lm=False)
    ids = torch.randint(0, 64, (2, 17))
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100
    total: dict = {}
    with HostSyncCounter() as counter:
        for _ in range(3):
            loss, tau = module(ids[:, :-1], labels, torch.tensor(28.0, dtype=torch.float64))
            loss.backward()
            metrics, _ = lm_step_metrics(loss, tau, labels)
            _accumulate(total, metrics, 3)
    # transformers 5.24 checks for packed sequences with one `if tensor.all()` per forward when there
    # is neither an attention mask nor a KV cache (use_cache=False); nothing else syncs.
    assert counter.where == ["masking_utils.py:find_packed_sequence_indices"] * 3, counter.where
    assert set(total) == {"batch/loss", "tau/mean", "tau/min", "tau/max"}
    assert all(isinstance(v, torch.Tensor) for v in total.values())


def test_clip_dro_micro_steps_make_no_host_sync():
    from dist_tempnet.losses.contrastive import build_contrastive_loss
    from dist_tempnet.tasks.clip import clip_step_metrics

    torch.manual_seed(0)
    loss_fn = build_contrastive_loss(
        "isogclr_tempnet", num_samples=64, gamma=0.9, rho=6.0, embed_dim=16, num_prototypes=8
    )
    total: dict = {}
    with HostSyncCounter() as counter:
        for _ in range(3):
            img = nn.functional.normalize(torch.randn(8, 16, requires_grad=True), dim=-1)
            txt = nn.functional.normalize(torch.randn(8, 16, requires_grad=True), dim=-1)
            ids = torch.randperm(64)[:8]
            out = loss_fn(img, txt, ids)
            out.loss.backward()
            _accumulate(total, clip_step_metrics(out.loss, out.image_tau, out.text_tau, out.tensor_stats), 3)
    # The id range check reads a bool only for CPU ids (free); on an accelerator it is an async
    # device assertion. Nothing else syncs: no torch.unique, no boolean-mask indexing, no .item().
    syncs = [w for w in counter.where if w != "dro_state.py:_check_ids"]
    assert syncs == [], syncs
    assert "train/loss_internals/objective" in total and "train/tau/image_min" in total
    # The loss did update the DRO state (the sync-free update path really ran).
    assert int(loss_fn.dro_state.visited.sum()) > 0


def test_mfu_counts_no_backbone_backward_for_tempnet_only():
    import importlib.util

    from dist_tempnet.models.lm import count_parameters

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n = count_parameters("llama_1b")
    full = bench.model_flops_per_token(n, 16, 2048, 2048, backbone_backward=True)
    frozen = bench.model_flops_per_token(n, 16, 2048, 2048, backbone_backward=False)
    assert full == 6 * n + 12 * 16 * 2048 * 2048
    assert frozen == pytest.approx(full / 3)  # forward only: a third of the work


# -- a GPU box without Ray, MLflow or webdataset ------------------------------------------------

BLOCKER = """
import importlib.abc, importlib.util, sys
BLOCKED = ("ray", "mlflow", "webdataset")
def _blocked(name):
    return name.split(".")[0] in BLOCKED
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
_find_spec = importlib.util.find_spec  # what transformers/accelerate use to probe for packages
importlib.util.find_spec = lambda name, package=None: None if _blocked(name) else _find_spec(name, package)
sys.meta_path.insert(0, Block())
"""


def test_worker_and_benchmarks_import_without_ray_mlflow_webdataset(tmp_path):
    import subprocess

    (tmp_path / "sitecustomize.py").write_text(BLOCKER)  # applies to every python started below
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{repo}", DS_ACCELERATOR="cpu")
    code = (
        "import importlib, sys\n"
        "for m in ('ray', 'mlflow', 'webdataset'):\n"
        "    try:\n        importlib.import_module(m)\n    except ImportError:\n        pass\n"
        "    else:\n        sys.exit(f'{m} was not blocked')\n"
        "import dist_tempnet.train, dist_tempnet.runtime.trainer\n"
        "import dist_tempnet.tasks.lm, dist_tempnet.tasks.clip\n"
        "import dist_tempnet.data.reader, dist_tempnet.data.shards\n"
        "print('imported')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]
    for script in ("train_throughput.py", "clip_throughput.py", "gpu_lm_loss.py", "lm_loss.py"):
        proc = subprocess.run(
            [sys.executable, str(repo / "benchmarks" / script), "--help"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (script, proc.stderr[-3000:])


# -- CLIP input: uint8, pinned for CUDA, normalized on the device --------------------------------


def test_clip_batches_travel_as_uint8_pinned_for_cuda_and_normalize_on_the_device(tmp_path):
    from dist_tempnet.data import make_demo_clip_dataset
    from dist_tempnet.data.collate import CLIP_MEAN, CLIP_STD, normalize_pixels
    from dist_tempnet.tasks.clip import CLIPTask

    data = make_demo_clip_dataset(
        tmp_path / "demo", num_train=16, num_eval=8, image_size=16, samples_per_shard=8
    )
    overrides = ["ray.num_workers=1", "train.micro_batch_size=4", "train.global_batch_size=4"]
    cfg = load_config(None, [*overrides, f"data.path={data}", "data.image_size=16", "data.num_workers=1"])
    # What a CUDA worker gets (no GPU needed: the stream's DataLoader has not started yet).
    assert CLIPTask(cfg, 0, 1, torch.device("cuda", 0))._open_stream(None).loader_kwargs()["pin_memory"]
    task = CLIPTask(cfg, 0, 1, torch.device("cpu"))
    with task._open_stream(None) as stream:
        assert stream.loader_kwargs()["pin_memory"] is False  # pinning costs and buys nothing on CPU
        pixels = next(stream)["pixel_values"]
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 16, 16)
    # The float32 host path the collator had before: /255, then CLIP's mean and std.
    mean, std = (torch.tensor(c).view(1, 3, 1, 1) for c in (CLIP_MEAN, CLIP_STD))
    before = pixels.float().div(255.0).sub(mean).div(std)
    torch.testing.assert_close(normalize_pixels(pixels), before)
    with torch.no_grad():  # the task normalizes uint8 input itself, to the same embeddings
        torch.testing.assert_close(task.module.embed(pixels)[0], task.module.embed(before)[0])


def test_in_process_stream_pins_its_batches(tmp_path, monkeypatch):
    """num_workers=0 has no DataLoader to pin: the stream pins each batch itself. CPU-only torch
    cannot pin, so record the calls."""
    from dist_tempnet.data import clip_batches, make_demo_clip_dataset

    data = make_demo_clip_dataset(
        tmp_path / "demo", num_train=8, num_eval=8, image_size=16, samples_per_shard=8
    )
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.dtype) or t)
    with clip_batches(data, batch_size=4, pin_memory=True) as stream:
        batch = next(stream)
    assert batch["pixel_values"].dtype == torch.uint8
    assert torch.uint8 in pinned and pinned.count(torch.int64) >= 4  # pixels, ids, mask, sample ids, labels
    with clip_batches(data, batch_size=4) as stream:
        pinned.clear()
        next(stream)
    assert pinned == []
