"""Keep the throughput benchmarks from rotting: each runs at a tiny size on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*args: str, cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_train_throughput_tiny(tmp_path):
    # One variant: the script's own CLI and table. Both tiny variants (ce:scratch, tempnet:tempnet_only)
    # run through the same `measure` in test_gpu_suite_tiny; the "vs plain" column is checked below.
    out = _run(
        str(REPO / "benchmarks" / "train_throughput.py"),
        "--tiny",
        "--workdir",
        str(tmp_path),
        "--variants",
        "tempnet:tempnet_only",
        cwd=tmp_path,
    )
    assert "tempnet:tempnet_only" in out and "tokens/s" in out


def test_train_throughput_table_compares_each_variant_with_plain_ce(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_throughput", REPO / "benchmarks" / "train_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = {"zero": 2, "step_s": 0.1, "peak_gib": 0.5, "unit": "tokens", "device": "cpu"}
    module.report(
        [
            {"variant": "ce:scratch", "rate": 200.0} | row,
            {"variant": "tempnet:tempnet_only", "rate": 100.0} | row,
        ]
    )
    out = capsys.readouterr().out
    assert "ce:scratch" in out and "tokens/s" in out
    assert out.splitlines()[-2].split()[-1] == "0.500", out  # tempnet's rate / plain CE's, same ZeRO stage


def test_clip_throughput_tiny(tmp_path):
    out = _run(
        str(REPO / "benchmarks" / "clip_throughput.py"),
        "--tiny",
        "--losses",
        "isogclr_tempnet",
        "--workdir",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert "isogclr_tempnet" in out and "disk/compute" in out


def test_gpu_lm_loss_tiny_on_cpu(tmp_path):
    out = _run(str(REPO / "benchmarks" / "gpu_lm_loss.py"), "--tiny", cwd=tmp_path)
    assert "target peak fused/chunked_ce" in out and "target time fused/full_ce" in out


def test_lm_loss_compiled_kernel_tiny(tmp_path):
    """The benchmark's compiled variant (CPU inductor) next to the eager one, with its compile time;
    the interleaved timing mode and the chunk-pass mode."""
    script = str(REPO / "benchmarks" / "lm_loss.py")
    out = _run(script, "--tiny", "--variants", "fused_eager,fused_compiled", cwd=tmp_path)
    assert "\nfused_compiled " in out and "fused_compiled/fused_eager: memory" in out
    out = _run(script, "--tiny", "--interleave", "--variants", "fused_eager,full_ce", cwd=tmp_path)
    assert "interleaved" in out and "fused_eager/full_ce: time" in out
    out = _run(script, "--tiny", "--chunk-pass", "--repeats", "3", cwd=tmp_path)
    assert "compiled/eager: time" in out


def test_gpu_suite_tiny(tmp_path):
    import json
    import os

    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--tiny", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=1200,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SUITE_JSON "))
    result = json.loads(line[len("SUITE_JSON ") :])
    assert {r["variant"] for r in result["lm_loss"]} == {
        "naive",
        "fused",
        "fused_eager",
        "chunked_ce",
        "full_ce",
    }
    assert {r["variant"] for r in result["worker_loop"]} == {"ce:scratch", "tempnet:tempnet_only"}
    assert {r["source"] for r in result["clip"]} == {"random", "disk"}
    assert "| LLaMA loop | tempnet:tempnet_only | 2 |" in proc.stdout


def test_tempnet_effect_tiny(tmp_path):
    out = _run(
        str(REPO / "benchmarks" / "tempnet_effect.py"),
        "--tiny",
        "--seeds",
        "0",
        "--workdir",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
        timeout=1200,  # five short training runs in one process: about a minute of CPU, more when shared
    )
    # One sweep: the compare table of its children, then the focused table of every method.
    assert "=== sweep tempnet-effect-" in out and "Runs (5):" in out
    assert "Does TempNet help here?" in out
    for method in ("clip", "isogclr", "isogclr_tempnet", "ce", "tempnet"):
        assert f"| {method} | 1 |" in out, method
    assert (tmp_path / "out" / "tempnet_effect.md").read_text().startswith("### Does TempNet help here?")
