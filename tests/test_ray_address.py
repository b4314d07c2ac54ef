"""`RAY_ADDRESS` and other Ray instances on the machine: a Jobs API URL is not an address `train` can
join, and a local job talks only to its own Ray instance (no "Found multiple active Ray instances"
traceback from Ray Train's PlacementGroupCleaner when another Ray runs here)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_tempnet.commands.cli import main
from dist_tempnet.config import load_config
from dist_tempnet.driver.launcher import resolve_ray_address

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "train.steps=2",
    "train.log_every=1",
    "data.demo_num_train=64",
    "data.demo_num_eval=16",
    "data.image_size=16",
    "train.global_batch_size=16",
    "train.micro_batch_size=16",
    "ray.num_workers=1",
    "eval.max_batches=1",
]


def _paths(tmp_path: Path) -> list[str]:
    return [
        f"run.output_dir={tmp_path / 'runs'}",
        f"data.path={tmp_path / 'data'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]


def test_jobs_api_url_in_ray_address_is_refused_before_anything_starts(tmp_path, capsys):
    assert main(["train", *TINY, *_paths(tmp_path), "ray.address=http://127.0.0.1:8265"]) == 2
    err = capsys.readouterr().err
    assert "Jobs API" in err and "dist-tempnet submit --address http://127.0.0.1:8265" in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "data").exists()


def test_jobs_api_url_in_the_environment_is_not_joined(monkeypatch, caplog):
    cfg = load_config(None, [])
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with caplog.at_level(logging.WARNING):
        assert resolve_ray_address(cfg) == ""  # start a local Ray
    assert "Jobs API address" in caplog.text and "dist-tempnet submit" in caplog.text
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert resolve_ray_address(cfg) == "10.0.0.5:6379"


OTHER_RAY = """
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=False)
print("other Ray up", flush=True)
sys.stdin.read()  # until the test closes stdin
ray.shutdown()
"""


@pytest.mark.slow
def test_local_job_with_another_ray_running_and_a_jobs_api_ray_address(tmp_path):
    """The README's old local-cluster section left RAY_ADDRESS=http://127.0.0.1:8265 exported; with
    another Ray instance on the machine every local run printed Ray Train's 30-line traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert other.stdout.readline().strip() == "other Ray up"
        job = subprocess.run(
            [sys.executable, "-m", "dist_tempnet.commands.cli", "train", *TINY, *_paths(tmp_path)],
            env=env | {"RAY_ADDRESS": "http://127.0.0.1:8265"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-4000:]
    assert "is a Ray Jobs API address" in output and "final loss" in output
    assert "Found multiple active Ray instances" not in output, output[-4000:]
