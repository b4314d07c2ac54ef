"""lm-evaluation-harness with TempNet's τ: the `dist_tempnet` model class, its CLI and `dist-tempnet eval`.

The task is defined here from a local jsonl file (lm-eval's `json` dataset builder), so nothing is
downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests._tiny_hf import save_tiny_chat_model

QUESTIONS = [
    ("what is the capital of france", ["paris", "london", "river"], 0),
    ("the quick brown fox jumps over the lazy", ["dog", "capital", "yes"], 0),
    ("a small cat sleeps on the warm", ["mat", "france", "question"], 0),
    ("hello", ["world", "mountain", "false"], 0),
    ("thank you, you are a helpful", ["model", "river", "lazy"], 0),
    ("true or", ["false", "paris", "brown"], 0),
]


def _task_dir(root: Path) -> Path:
    data = root / "tiny_qa.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in QUESTIONS)
    )
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_qa.yaml").write_text(
        f"""task: tiny_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
    )
    return tasks


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, Path]:
    """An export directory as `dist-tempnet export` writes it: model, tokenizer, TempNet, export info."""
    from dist_tempnet.runtime.export import save_tempnets
    from dist_tempnet.tempnet import LMTempNet

    root = tmp_path_factory.mktemp("lmeval")
    model_dir = save_tiny_chat_model(root / "export")
    config = json.loads((model_dir / "config.json").read_text())
    torch.manual_seed(0)
    net = LMTempNet(config["vocab_size"], hidden_size=16, tau_min=0.05, tau_max=0.1, dropout=0.0)
    save_tempnets({"lm": net}, model_dir)
    return model_dir, _task_dir(root)


def test_dist_tempnet_model_applies_tau_to_loglikelihood_and_generation(export):
    from dist_tempnet.runtime.lm_eval_harness import TempNetHFLM

    model_dir, _ = export
    with_tau = TempNetHFLM(pretrained=str(model_dir), device="cpu", batch_size=2)
    plain = TempNetHFLM(pretrained=str(model_dir), device="cpu", batch_size=2, tempnet="false")
    assert plain.tempnet is None and with_tau.tempnet is not None
    ids = torch.tensor([[5, 9, 13, 7, 3]])
    raw = plain._model_call(ids)
    scaled = with_tau._model_call(ids)
    tau = with_tau.tau(raw)
    assert bool(((tau >= 0.05) & (tau <= 0.1)).all())
    assert torch.allclose(scaled, raw / tau.unsqueeze(-1), atol=1e-5)
    # Generation samples from softmax(z / τ): with τ ≤ 0.1 it is nearly greedy; at τ = 1 it is not.
    greedy = plain._model_generate(ids, 12, [], do_sample=False)
    torch.manual_seed(1)
    sampled_tau = with_tau._model_generate(ids, 12, [], do_sample=True, temperature=1.0)
    torch.manual_seed(1)
    sampled_plain = plain._model_generate(ids, 12, [], do_sample=True, temperature=1.0)
    agree_tau = (sampled_tau[0, 5:] == greedy[0, 5:]).float().mean()
    agree_plain = (sampled_plain[0, 5:] == greedy[0, 5:]).float().mean()
    assert agree_tau > agree_plain, (agree_tau, agree_plain)


def test_dist_tempnet_eval_lm_eval_logs_to_mlflow(export, tmp_path):
    # (lm-eval's own CLI, `dist-tempnet-lm-eval`, indexes all ~15k built-in task configs before it
    # runs: minutes on a loaded CI box, so it is not run here; this command skips that index.)
    from mlflow.tracking import MlflowClient

    from dist_tempnet.commands.cli import main as dt_main

    model_dir, tasks = export
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("train")
    run_id = client.create_run(exp).info.run_id
    (model_dir / "dist_tempnet_export.json").write_text(json.dumps({"step": 7, "mlflow_run_id": run_id}))
    scores = {}
    for flag in ([], ["--no-tempnet"]):
        args = ["eval", "--lm-eval", "tiny_qa", "--model", str(model_dir), "--lm-eval-include", str(tasks)]
        args += ["--log-to-mlflow", "--tracking-uri", uri, "--json", str(tmp_path / "r.json"), *flag]
        assert dt_main(args) == 0
        scores.update(json.loads((tmp_path / "r.json").read_text())["metrics"])
    metrics = client.get_run(run_id).data.metrics
    assert {"lm_eval/tiny_qa/acc", "lm_eval_no_tempnet/tiny_qa/acc"} <= set(metrics)
    assert metrics["lm_eval/tiny_qa/acc"] == scores["lm_eval/tiny_qa/acc"]
    history = client.get_metric_history(run_id, "lm_eval/tiny_qa/acc")
    assert history[0].step == 7
    print(
        "tiny_qa acc with τ / at τ=1:",
        scores["lm_eval/tiny_qa/acc"],
        scores["lm_eval_no_tempnet/tiny_qa/acc"],
    )
