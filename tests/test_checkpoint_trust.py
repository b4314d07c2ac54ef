"""No code runs from a checkpoint, and a checkpoint that changed since it was saved is not loaded.

Attacks tried, each on its own copy of a checkpoint written by the real save path:
- a pickle payload (an object whose __reduce__ writes a marker file) in `rank_0.pt`, with the file
  list's size and SHA-256 updated as an attacker who can write the directory would: refused by
  `train --resume`, by the worker's load (Ray's own restore path) and by `load_trusted`;
- the same payload in DeepSpeed's `mp_rank_00_model_states.pt`: refused by `eval` and `export`,
  and by DeepSpeed's own torch.load (weights_only=False in its code) under `weights_only_loads`;
- 4 KiB zeroed inside the optimizer state file, and bytes changed in `rank_0.pt`, file lists
  untouched: refused by SHA-256, naming the file and both digests.
In every case the marker file must not exist afterwards.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_tempnet.commands.cli import main
from dist_tempnet.config import CheckpointError, Config
from dist_tempnet.runtime.checkpoint import (
    LocalSink,
    layout,
    load_trusted,
    rng_state,
    set_rng_state,
    verify_checkpoint,
    weights_only_loads,
)

TAG = "step_00000002"
MODEL = f"deepspeed/{TAG}/mp_rank_00_model_states.pt"
OPTIM = f"deepspeed/{TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt"


class _Engine:
    """Writes files shaped like DeepSpeed's (torch.save zips of tensors) where DeepSpeed would."""

    def save_checkpoint(self, directory: str, tag: str, save_latest: bool) -> None:
        d = Path(directory) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.randn(64, 64)}}, d / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"exp_avg": torch.randn(64, 128)}}, d / Path(OPTIM).name)
        (Path(directory) / "latest").write_text(tag)


def _checkpoint(root: Path, mlflow_run_id: str = "", tracking_uri: str = "", data: str = "") -> Path:
    cfg = Config()
    cfg.ray.num_workers = 1
    cfg.data.path = data or cfg.data.path
    cfg.mlflow.tracking_uri = tracking_uri
    extra = {"mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri}
    return Path(LocalSink(root, keep_last=2).save(_Engine(), 2, {"data": None}, cfg.to_dict(), {}, extra))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",))


def _plant_payload(ckpt: Path, rel: str, marker: Path) -> None:
    """Replace `rel` by a pickle carrying a payload and update the file list to match."""
    torch.save({"task": {"data": None}, "module": {}, "x": _Payload(marker)}, ckpt / rel)
    listing = ckpt / "files_rank_0.json"
    files = json.loads(listing.read_text())
    data = (ckpt / rel).read_bytes()
    files[rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    listing.write_text(json.dumps(files))


def test_save_records_sha256_and_rng_states_load_weights_only(tmp_path):
    ckpt = _checkpoint(tmp_path / "run")
    files = json.loads((ckpt / "files_rank_0.json").read_text())
    assert set(files) == {"rank_0.pt", "meta.json", "deepspeed/latest", MODEL, OPTIM}
    for rel, entry in files.items():
        data = (ckpt / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    verify_checkpoint(ckpt)
    # RNG states survive a weights_only round trip and restore every generator.
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert "python" in load_trusted(ckpt / "rank_0.pt")["rng"]


def test_changed_bytes_are_refused_naming_the_file_and_digests(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "run")
    listed = json.loads((ckpt / "files_rank_0.json").read_text())
    optim = bytearray((ckpt / OPTIM).read_bytes())
    optim[8192 : 8192 + 4096] = bytes(4096)  # 4 KiB zeroed inside the Adam moments, same size
    (ckpt / OPTIM).write_bytes(bytes(optim))
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(ckpt)
    actual = hashlib.sha256(bytes(optim)).hexdigest()
    assert OPTIM in str(err.value) and listed[OPTIM]["sha256"] in str(err.value) and actual in str(err.value)
    assert main(["train", "--no-ray", "--resume", str(ckpt)]) == 2
    assert f"{OPTIM} is not the file that was saved: SHA-256 {actual}" in capsys.readouterr().err

    ckpt = _checkpoint(tmp_path / "run2")
    rank = bytearray((ckpt / "rank_0.pt").read_bytes())
    rank[-200:-190] = b"\xff" * 10
    (ckpt / "rank_0.pt").write_bytes(bytes(rank))
    with pytest.raises(CheckpointError, match="rank_0.pt is not the file that was saved: SHA-256"):
        load_trusted(ckpt / "rank_0.pt")
    assert main(["train", "--no-ray", "--resume", str(ckpt)]) == 2
    assert "rank_0.pt is not the file that was saved" in capsys.readouterr().err


def test_pickle_payload_is_refused_by_resume_eval_export_and_loads(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "PAYLOAD_RAN"
    ckpt = _checkpoint(tmp_path / "run")
    _plant_payload(ckpt, "rank_0.pt", marker)
    assert main(["train", "--no-ray", "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"refused to load '{ckpt / 'rank_0.pt'}'" in err and "builtins.exec" in err, err
    # Without the static scan that names it, torch's weights_only unpickler still refuses it.
    monkeypatch.setattr(layout, "_check_pickle_globals", lambda path: None)
    with pytest.raises(CheckpointError, match="refused to load .*rank_0.pt.*exec"):
        load_trusted(ckpt / "rank_0.pt")
    monkeypatch.undo()

    from dist_tempnet.data import make_demo_clip_dataset

    data = make_demo_clip_dataset(tmp_path / "demo", num_train=32, num_eval=32, samples_per_shard=32, seed=0)
    ckpt = _checkpoint(tmp_path / "run2", data=str(data))
    _plant_payload(ckpt, MODEL, marker)
    assert main(["eval", "--checkpoint", str(ckpt)]) == 2
    assert f"refused to load '{ckpt / MODEL}'" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")]) == 2
    assert f"refused to load '{ckpt / MODEL}'" in capsys.readouterr().err
    # DeepSpeed 0.19.8 loads its files with weights_only=False: forced to True here.
    with pytest.raises(CheckpointError, match="refused to load"), weights_only_loads():
        torch.load(ckpt / MODEL, weights_only=False)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert not marker.exists(), "the payload ran"


# A failed resume must leave the MLflow run it reopened as it was. Ray's restore of a run of the
# same name reaches the workers' load without the driver's checks: the load refuses the payload.
FAILED_RESUME = """
import sys
from pathlib import Path
from dist_tempnet.driver.launcher import run_training
from dist_tempnet.driver.resume import config_for_resume
ckpt = Path(sys.argv[1])
cfg = config_for_resume(ckpt, [f"data.path={sys.argv[2]}", "data.demo_num_train=64", "data.demo_num_eval=32",
                               "train.steps=3", "run.output_dir=" + sys.argv[3]])
try:
    run_training(cfg, use_ray=False, resume_from=ckpt)
except Exception as exc:
    print("FAILED WITH", type(exc).__name__, exc)
"""


@pytest.mark.slow
def test_failed_resume_keeps_the_reopened_runs_status(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("dist_tempnet"))
    client.set_terminated(run.info.run_id, "FINISHED", end_time=1_700_000_000_000)
    ckpt = _checkpoint(tmp_path / "run", run.info.run_id, uri)
    marker = tmp_path / "PAYLOAD_RAN"
    _plant_payload(ckpt, "rank_0.pt", marker)
    proc = subprocess.run(
        [sys.executable, "-c", FAILED_RESUME, str(ckpt), str(tmp_path / "data"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )
    assert "FAILED WITH CheckpointError refused to load" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert not marker.exists(), "the payload ran"
    info = client.get_run(run.info.run_id).info
    assert (info.status, info.end_time) == ("FINISHED", 1_700_000_000_000)
