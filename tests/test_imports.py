"""The worker loop must run where Ray and MLflow are not installed (a bare GPU box)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import dist_tempnet as dt
dt.LMTempNet, dt.CLIPTempNet, dt.tempnet_lm_loss, dt.GlobalDROContrastiveLoss
import dist_tempnet.runtime.trainer, dist_tempnet.tasks.clip, dist_tempnet.tasks.lm
import dist_tempnet.runtime.checkpoint, dist_tempnet.train
import dist_tempnet.runtime.export, dist_tempnet.models.generation
heavy = sorted(m for m in ("ray", "mlflow") if m in sys.modules)
print("HEAVY", heavy)
"""


def test_package_and_worker_loop_import_without_ray_or_mlflow():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout


def test_plain_import_is_cheap():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, dist_tempnet; print(sorted(m for m in "
            "('torch', 'deepspeed', 'ray', 'mlflow', 'transformers') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
