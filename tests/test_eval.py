"""Evaluation: exact metrics on hand-made embeddings, and `dist-tempnet eval` on (corrupted) shards."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_tempnet.commands import cli
from dist_tempnet.config import Config
from dist_tempnet.metrics import (
    class_text_embeddings,
    perplexity,
    recall_at_k,
    retrieval_metrics,
    zero_shot_correct,
)

# ---------------------------------------------------------------------------------------------
# Pure metrics on known embeddings


def _ranked_queries() -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery = the 4 unit vectors; query i's true match is gallery i, ranked 0, 1, 2, 0."""
    gallery = torch.eye(4)
    query = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # its match scores highest
            [1.0, 0.5, 0.0, 0.0],  # gallery 0 scores higher than its match 1
            [1.0, 0.9, 0.3, 0.0],  # gallery 0 and 1 score higher than its match 2
            [0.0, 0.0, 0.0, 7.0],  # scale does not matter
        ]
    )
    return query, gallery


def test_recall_at_k_known_ranks():
    query, gallery = _ranked_queries()
    assert recall_at_k(query, gallery, ks=(1, 2, 3, 10)) == {1: 0.5, 2: 0.75, 3: 1.0, 10: 1.0}


def test_retrieval_metrics_both_directions():
    query, gallery = _ranked_queries()
    # Text→image uses the transposed similarity: text j's match image j against every image.
    # Column j of S = normalize(q)·gᵀ holds every image's score for text j: text 0 is matched best
    # by image 0 (rank 0); text 1 scores 0.447 with its image 1 but 0.9/|q2| = 0.653 with image 2
    # (rank 1); texts 2 and 3 score only with their own images (rank 0).
    m = retrieval_metrics(query, gallery, ks=(1, 5))
    assert m == {
        "i2t_recall_at_1": 0.5,
        "i2t_recall_at_5": 1.0,
        "t2i_recall_at_1": 0.75,
        "t2i_recall_at_5": 1.0,
    }


def test_recall_ties_count_against_the_query():
    collapsed = torch.ones(8, 4)  # every image and text embedding identical: no retrieval ability at all
    assert recall_at_k(collapsed, collapsed, ks=(1,))[1] == 0.0


def test_class_text_embeddings_normalizes_each_template_before_averaging():
    per_template = torch.tensor(
        [
            [[10.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # class 0: the large first template must not dominate
            [[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]],  # class 1
            [[0.0, 1.0, 0.0], [0.0, 3.0, 0.0]],  # class 2
        ]
    )
    emb = class_text_embeddings(per_template)
    s = 1 / math.sqrt(2)
    assert torch.allclose(emb, torch.tensor([[s, s, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))


def test_zero_shot_correct_known_answer():
    per_template = torch.tensor(
        [
            [[10.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            [[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]],
            [[0.0, 1.0, 0.0], [0.0, 3.0, 0.0]],
        ]
    )
    class_emb = class_text_embeddings(per_template)
    images = torch.tensor(
        [
            [0.6, 1.0, 0.0],  # class 0 (0.970) beats class 2 (0.857); unnormalized templates would say 2
            [0.2, 1.0, 0.0],  # class 2
            [0.0, 0.1, 5.0],  # class 1
            [1.0, 0.0, 0.0],  # class 0
        ]
    )
    assert zero_shot_correct(images, class_emb, torch.tensor([0, 2, 1, 0])) == 4
    assert zero_shot_correct(images, class_emb, torch.tensor([2, 2, 0, 0])) == 2


def test_perplexity():
    assert perplexity(4 * math.log(5.0), 4) == pytest.approx(5.0)
    assert perplexity(0.0, 10) == 1.0
    assert math.isnan(perplexity(0.0, 0))


# ---------------------------------------------------------------------------------------------
# `dist-tempnet eval` plumbing with a stand-in model (fast): data errors surface as one clear line


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from dist_tempnet.data import make_demo_clip_dataset

    root = tmp_path_factory.mktemp("evaldata") / "demo"
    make_demo_clip_dataset(root, num_train=64, num_eval=64, samples_per_shard=32, seed=0)
    return root


def _fake_checkpoint(root: Path, data: Path) -> Path:
    cfg = Config()
    cfg.data.path = str(data)
    ckpt = root / "step_00000002"
    (ckpt / "deepspeed").mkdir(parents=True)
    meta = {"step": 2, "tag": "step_00000002", "world_size": 2, "config": cfg.to_dict(), "mlflow_run_id": ""}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / "COMPLETE").write_text("2")
    return ckpt


class _ReadsEvalSplit:
    """Stands in for a task: reads the eval split through the real data layer, counts samples."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def evaluate(self, engine) -> dict[str, float]:
        from dist_tempnet.data import eval_batches, load_text_tokenizer, resolve_manifest

        train = resolve_manifest(self.cfg.data.path, "train")
        stream = eval_batches(
            self.cfg.data.path,
            self.cfg.data.eval_split,
            batch_size=16,
            tokenizer=load_text_tokenizer(train.tokenizer_path),
        )
        return {"eval/samples": float(sum(len(b["sample_ids"]) for b in stream))}


@pytest.fixture()
def fake_model(monkeypatch):
    from dist_tempnet.runtime import evaluation as eval_cli

    monkeypatch.setattr(eval_cli, "build_and_load", lambda cfg, ckpt, meta: (_ReadsEvalSplit(cfg), None))


def _corrupt_copy(src: Path, dst: Path) -> Path:
    """A copy of the dataset whose last eval shard has garbage in the middle (same size)."""
    shutil.copytree(src, dst)
    shard = sorted((dst / "eval").glob("*.tar"))[-1]
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 2000] = random.Random(0).randbytes(2000)
    shard.write_bytes(bytes(data))
    return shard


def test_eval_cli_reads_data_and_writes_json(demo_data, tmp_path, fake_model, capsys):
    ckpt = _fake_checkpoint(tmp_path / "ckpts", demo_data)
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "ckpts"), "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == {
        "checkpoint": str(ckpt),
        "step": 2,
        "metrics": {"eval/samples": 64.0},
    }
    assert "eval/samples" in capsys.readouterr().out


def test_eval_on_corrupt_shard_names_the_shard(demo_data, tmp_path, fake_model, capsys):
    _fake_checkpoint(tmp_path / "ckpts", demo_data)
    shard = _corrupt_copy(demo_data, tmp_path / "bad")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "ckpts"), "--data", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dist-tempnet eval: cannot evaluate on") and str(shard) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_on_truncated_shard_names_the_shard(demo_data, tmp_path, fake_model, capsys):
    _fake_checkpoint(tmp_path / "ckpts", demo_data)
    shutil.copytree(demo_data, tmp_path / "short")
    shard = sorted((tmp_path / "short" / "eval").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:5000])
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "ckpts"), "--data", str(tmp_path / "short")]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "Traceback" not in err


def test_eval_cli_clear_errors(tmp_path, demo_data, capsys):
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "half" / "step_00000001").mkdir(parents=True)  # no COMPLETE marker: never loaded
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "half")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    _fake_checkpoint(tmp_path / "ok", demo_data)
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "ok"), "--split", "nosuch"]) == 2
    assert "no eval split 'nosuch'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# End to end: train a tiny CLIP without Ray, evaluate its checkpoint, log to MLflow


@pytest.mark.slow
def test_eval_real_checkpoint_matches_training_and_logs(tmp_path):
    overrides = [
        "train.steps=2",
        "train.log_every=1",
        "train.warmup_steps=0",
        "data.demo_num_train=128",
        "data.demo_num_eval=64",
        "train.global_batch_size=32",
        "train.micro_batch_size=32",
        "eval.max_batches=0",
        "loss.name=isogclr_tempnet",
        "ray.num_workers=1",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    # In this process (the CLI, without a second interpreter importing torch); training and eval below
    # run as their own processes.
    make_shards = ["make-shards", "--out", str(tmp_path / "data" / "demo_clip"), "--num-train", "128"]
    assert cli.main(make_shards + ["--num-eval", "64"]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "dist_tempnet.train", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt_root = tmp_path / "runs" / "clip-tiny" / "checkpoints"
    meta = json.loads(next(ckpt_root.glob("step_*/meta.json")).read_text())
    trained = {k: v for k, v in meta["metrics"].items() if k.startswith("eval/")}
    assert trained and meta["mlflow_run_id"]

    out = tmp_path / "ev.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_tempnet.commands.cli",
            "eval",
            "--checkpoint",
            str(ckpt_root),
            "--json",
            str(out),
            "--log-to-mlflow",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = json.loads(out.read_text())["metrics"]
    # Same weights, same data, same world size: the same numbers as training's own final eval.
    assert evaluated == pytest.approx(trained, abs=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(meta["mlflow_run_id"], "eval/zero_shot_acc")
    assert len(history) == 2 and history[-1].value == pytest.approx(evaluated["eval/zero_shot_acc"])

    shard = _corrupt_copy(tmp_path / "data" / "demo_clip", tmp_path / "bad")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_tempnet.commands.cli",
            "eval",
            "--checkpoint",
            str(ckpt_root),
            "--data",
            str(tmp_path / "bad"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and str(shard) in done.stderr and "Traceback" not in done.stderr
