"""model.pretrained / data.tokenizer as local directories or hub ids (offline, from a cache built here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._tiny_hf import COMMIT, hub_cache_layout, save_tiny_chat_model

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported.
_PROBE = r"""
import json, sys, torch
from dist_tempnet.models.lm import build_causal_lm
from dist_tempnet.data import load_text_tokenizer
from dist_tempnet.commands.cli import main

local, hub_id = sys.argv[1], sys.argv[2]
a = build_causal_lm(pretrained=local)
b = build_causal_lm(pretrained=hub_id, dtype=torch.bfloat16)
b_at_commit = build_causal_lm(pretrained=hub_id, revision=sys.argv[3])
tok = load_text_tokenizer(hub_id)
sa, sb = a.state_dict(), b.state_dict()
out = {
    "local_dtype": str(next(a.parameters()).dtype),
    "hub_dtype": str(next(b.parameters()).dtype),
    "same_weights": all(torch.equal(sa[k].bfloat16(), sb[k]) for k in sa),
    "commit_same": all(torch.equal(sa[k], v) for k, v in b_at_commit.state_dict().items()),
    "chat_template": bool(tok.chat_template),
}
try:
    build_causal_lm(pretrained="tiny-org/no-such-model")
    out["unknown"] = "loaded?!"
except FileNotFoundError as exc:
    out["unknown"] = str(exc)
# The driver refuses the unknown id before any worker (or Ray, or an MLflow run) starts.
out["train_rc"] = main([
    "train", "--config", sys.argv[4], "model.pretrained=tiny-org/no-such-model",
    "data.path=" + sys.argv[5], "data.demo=false", "mlflow.enabled=false",
])
print("RESULT " + json.dumps(out))
"""


def test_local_dir_and_hub_cache_load_offline_and_unknown_id_fails(tmp_path):
    model_dir = save_tiny_chat_model(tmp_path / "tiny-chat")
    hf_home = tmp_path / "hf_home"
    hub_cache_layout(model_dir, hf_home, "tiny-org/tiny-chat")
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
    }
    env.pop("HF_HUB_CACHE", None)
    args = [str(model_dir), "tiny-org/tiny-chat", COMMIT]
    args += [str(REPO / "configs" / "lm_tiny_tempnet_only.yaml"), str(tmp_path / "no-data")]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    assert out["local_dtype"] == "torch.float32" and out["hub_dtype"] == "torch.bfloat16"
    assert out["same_weights"] and out["commit_same"] and out["chat_template"]
    # One clear error: the id, and what was tried (no local path, not in the cache, offline).
    msg = out["unknown"]
    assert "model.pretrained" in msg and "tiny-org/no-such-model" in msg
    assert "does not exist" in msg and str(hf_home / "hub") in msg and "HF_HUB_OFFLINE=1" in msg
    assert out["train_rc"] == 2
    assert "tiny-org/no-such-model" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr


def test_path_like_names_are_not_hub_ids(tmp_path):
    from dist_tempnet.models.hub import PretrainedNotFoundError, resolve_pretrained

    with pytest.raises(PretrainedNotFoundError, match="does not exist.*not a hub id"):
        resolve_pretrained(str(tmp_path / "missing" / "model"))
    with pytest.raises(PretrainedNotFoundError, match="neither a local path nor a hub id"):
        resolve_pretrained("bad id with spaces")
