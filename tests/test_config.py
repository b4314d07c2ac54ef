"""Config loading and validation: every error names the key, nothing starts on a bad config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dist_tempnet.commands.cli import main as cli_main
from dist_tempnet.config import (
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[1]


def test_embedded_default_equals_clip_tiny_yaml():
    assert load_config(None) == load_config(REPO / "configs" / "clip_tiny.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert config_from_dict(cfg.to_dict()) == cfg


def _candidates(cfg: Config) -> int:
    """How many candidates τ's softmax runs over: CLIP, the n − 1 negatives of an anchor in the global
    batch; LM, the vocabulary (the preset's, or the demo corpus's BPE vocabulary)."""
    import inspect

    from dist_tempnet.data.demo_text import make_demo_text_dataset
    from dist_tempnet.models.lm import LM_PRESETS

    if cfg.run.task == "clip":
        return cfg.train.global_batch_size - 1
    vocab = LM_PRESETS[cfg.model.preset][1].get("vocab_size")
    if vocab is None:
        assert cfg.data.demo, f"{cfg.run.name}: a preset without a vocabulary needs the demo data here"
        vocab = inspect.signature(make_demo_text_dataset).parameters["vocab_size"].default
    return vocab


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_keep_rho_below_log_candidates(path):
    """ρ ≥ log(candidates) pushes every τ to tau_min (tau_stats.rho_floor_warning): no shipped config
    with a per-sample τ may do that; the tiny ones keep a margin of at least 2 nats."""
    cfg = load_config(path)
    if cfg.loss.name not in ("isogclr", "isogclr_tempnet", "tempnet") and not path.name.startswith("lm_tiny"):
        return
    ceiling = math.log(_candidates(cfg))
    margin = 2.0 if "tiny" in path.name else 0.0
    assert cfg.loss.rho < ceiling - margin, f"{path.name}: rho={cfg.loss.rho}, log(candidates)={ceiling:.2f}"


def test_overrides_apply_with_types():
    cfg = load_config(
        None,
        [
            "train.steps=50",
            "train.lr=1e-3",
            "loss.name=isogclr_tempnet",
            "ray.num_workers=1",
            "model.overrides={projection_dim: 32}",
        ],
    )
    assert cfg.train.steps == 50 and cfg.train.lr == 1e-3 and cfg.loss.name == "isogclr_tempnet"
    assert cfg.model.overrides == {"projection_dim": 32}
    assert cfg.grad_accum_steps == 2


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=5", "train.stepz"),
        ("nosuch.key=1", "nosuch"),
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("train.global_batch_size=100", "train.global_batch_size"),
        ("train.precision=fp16", "train.precision"),
        ("loss.name=isogclr_tempnetx", "loss.name"),
        ("loss.tau_min=0.5", "loss.tau_min"),
        ("ray.num_workers=0", "ray.num_workers"),
        ("ray.placement_strategy=spread", "ray.placement_strategy"),
        ("run.task=lm", "loss.name"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ("train.betas=[0.9]", "train.betas"),
        ("data.demo_class_zipf=-1", "data.demo_class_zipf"),
        ("data.demo_caption_noise=1.5", "data.demo_caption_noise"),
        ("loss.tempnet_readout_temperature=0", "loss.tempnet_readout_temperature"),
        ("loss.tempnet_readout_temperature=-0.01", "loss.tempnet_readout_temperature"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_file_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  step: 3\n")
    with pytest.raises(ConfigError, match=r"unknown\.yaml.*train\.step"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_finetune_needs_pretrained():
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(REPO / "configs" / "lm_tiny_scratch.yaml", ["train.mode=finetune"])


def test_parse_override_rejects_undotted():
    with pytest.raises(ConfigError):
        parse_override("steps=3")
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


def test_dump_roundtrip():
    import yaml

    cfg = load_config(None, ["train.steps=7"])
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    assert isinstance(cfg, Config)


def test_cli_rejects_bad_config_before_any_worker(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli_main(["train", "train.global_batch_size=100"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size" in err and "divisible" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data").exists()
