"""Bad inputs are refused by the driver in seconds, before an MLflow run exists and before Ray starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dist_tempnet.commands import cli
from dist_tempnet.config import ConfigError, load_config
from dist_tempnet.data import make_demo_clip_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_clip_dataset(
        tmp_path_factory.mktemp("demo"), num_train=64, num_eval=32, samples_per_shard=32
    )


def _train(tmp_path: Path, capsys, *overrides: str, no_ray: bool = False) -> tuple[int, str]:
    db = tmp_path / "mlflow.db"
    argv = ["train", *(["--no-ray"] if no_ray else []), f"mlflow.tracking_uri=sqlite:///{db}",
            f"run.output_dir={tmp_path / 'runs'}", "ray.address=127.0.0.1:1", *overrides]  # fmt: skip
    rc = cli.main(argv)
    err = capsys.readouterr().err
    # No MLflow run (not even the database) and no Ray (ray.address points nowhere: joining it would fail
    # with a different error).
    assert not db.exists(), "the MLflow store was touched before the input was checked"
    assert not (tmp_path / "runs").exists()
    return rc, err


def test_malformed_dataset_json(tmp_path, capsys, demo):
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    (data / "train" / "dataset.json").write_text('{"kind": "image_text", "shards": [')
    rc, err = _train(tmp_path, capsys, f"data.path={data}", "data.demo=false")
    assert rc == 2 and "data.train_split" in err and str(data / "train" / "dataset.json") in err
    assert "not valid JSON" in err


def test_missing_tokenizer(tmp_path, capsys, demo):
    rc, err = _train(tmp_path, capsys, f"data.path={demo}", f"data.tokenizer={tmp_path / 'nope'}")
    assert rc == 2 and "data.tokenizer" in err and str(tmp_path / "nope") in err


def test_tokenizer_named_by_the_dataset_is_checked(tmp_path, capsys, demo):
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    manifest = json.loads((data / "train" / "dataset.json").read_text())
    tokenizer = (data / "train" / manifest["metadata"]["tokenizer"]).resolve()
    (tokenizer if tokenizer.is_file() else tokenizer / "tokenizer.json").write_text("{broken")
    rc, err = _train(tmp_path, capsys, f"data.path={data}", "data.demo=false")
    assert rc == 2 and "data.tokenizer" in err and "tokenizer.json" in err and "not readable JSON" in err


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "has no config.json"),
        (
            lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "no-such-model"}')),
            "cannot be loaded",
        ),
        (
            lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "gpt2"}')),
            "run.task is 'clip'",
        ),
        (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "clip"}')), "has no weights"),
    ],
)
def test_bad_model_pretrained(tmp_path, capsys, demo, setup, expected):
    model = tmp_path / "model"
    setup(model)
    rc, err = _train(tmp_path, capsys, f"data.path={demo}", f"model.pretrained={model}")
    assert rc == 2 and "model.pretrained" in err and expected in err and str(model) in err


@pytest.mark.parametrize(
    "override", ["train.lr=inf", "loss.tau_max=.inf", "loss.gamma=nan", "train.lr=-.inf"]
)
def test_non_finite_numbers(tmp_path, capsys, override):
    rc, err = _train(tmp_path, capsys, override)
    key = override.partition("=")[0]
    assert rc == 2 and f"'{key}' expects a finite number" in err


def test_no_ray_validates_against_one_worker(tmp_path, capsys, demo):
    # 16 = 1 worker × 16: fine without Ray (the default 2 workers would not divide it); the run then
    # stops at the next check (the tokenizer), which proves the batch check passed.
    ok = ["train.global_batch_size=16", "train.micro_batch_size=16", f"data.path={demo}"]
    rc, err = _train(tmp_path, capsys, *ok, f"data.tokenizer={tmp_path / 'nope'}", no_ray=True)
    assert rc == 2 and "data.tokenizer" in err and "divisible" not in err
    rc, err = _train(tmp_path, capsys, "train.global_batch_size=24", "train.micro_batch_size=16", no_ray=True)
    assert rc == 2 and "1 × 16" in err


@pytest.mark.parametrize("value, expected", [("true", "true"), ("false", "false"), ("auto", "auto"),
                                             ("True", "true"), ("'false'", "false")])  # fmt: skip
def test_use_gpu_accepts_booleans(value, expected):
    assert load_config(None, [f"ray.use_gpu={value}"]).ray.use_gpu == expected
    with pytest.raises(ConfigError, match="ray.use_gpu"):
        load_config(None, ["ray.use_gpu=sometimes"])
