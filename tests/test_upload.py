"""What `dist-tempnet submit` uploads: no secrets, and all of the package.

The file lists come from Ray's own packaging function (the zip Ray would upload), so these tests see
exactly what a job would receive; none of them contacts a cluster.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dist_tempnet.commands.cli import main
from dist_tempnet.driver.submit import files_to_upload, package_working_dir

REPO = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"  # nothing listens there: a test that got that far would fail
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


KEPT = {
    "train.py": "print('job')\n",
    "pkg/__init__.py": "",
    "pkg/data/__init__.py": "X = 1\n",  # a package named like the root's data directory
    "pkg/runs.py": "",
    "configs/job.yaml": "train: {steps: 1}\n",
    "docs/keys.md": "Never commit a file starting with -----BEGIN RSA PRIVATE KEY-----\n",
}
SECRETS = {
    ".env": "MLFLOW_TRACKING_PASSWORD=hunter2\n",
    ".env.production": "AWS_SECRET_ACCESS_KEY=x\n",
    "deploy/.env": "TOKEN=x\n",
    ".ray/auth_token": "ray-token\n",
    "secrets/id_rsa": KEY,
    "secrets/id_ed25519.pub": "ssh-ed25519 AAAA\n",
    "tls/server.pem": "cert\n",
    "tls/server.key": "key\n",
    "tls/client.p12": "p12\n",
    "credentials.json": "{}\n",
    "gcp/my-service-account-42.json": "{}\n",
    ".aws/credentials": "[default]\n",
    "home/.config/gcloud/application_default_credentials.json": "{}\n",
    ".netrc": "machine x login y password z\n",
    ".pypirc": "[pypi]\n",
    ".git/config": "[core]\n",
    "data/train.tar": "shard\n",  # the root's data directory: datasets are not code
    "runs/clip/meta.json": "{}\n",
    "mlflow.db": "sqlite\n",
    "scratch/notes.txt": "ignored by .gitignore\n",
}


def test_upload_leaves_out_secrets_and_gitignored_files_but_not_packages(tmp_path):
    root = _tree(tmp_path / "job", {**KEPT, **SECRETS, ".gitignore": "/scratch/\n"})
    uploaded = {f.path for f in files_to_upload(root)}
    assert uploaded == {*KEPT, ".gitignore"}, sorted(uploaded ^ {*KEPT, ".gitignore"})


def test_dry_run_lists_files_with_sizes_and_contacts_no_cluster(tmp_path, capsys):
    root = _tree(tmp_path / "job", {**KEPT, ".env": "SECRET=1\n"})
    rc = main(
        ["submit", "--address", CLOSED, "--working-dir", str(root), "--dry-run", "--", "python", "train.py"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{len(KEPT)} files would be uploaded" in out and "dry run: nothing submitted" in out
    assert "13 B  train.py" in out and "total" in out and ".env\n" not in out


def test_a_private_key_is_refused_unless_forced(tmp_path, capsys):
    root = _tree(tmp_path / "job", {**KEPT, "deploy/ci_key.txt": "\n" + KEY})
    args = ["submit", "--address", CLOSED, "--working-dir", str(root), "--dry-run"]
    assert main([*args, "--", "python", "train.py"]) == 2
    err = capsys.readouterr().err
    assert "refusing to upload what looks like private keys: deploy/ci_key.txt" in err
    assert main([*args, "--force-secrets", "--", "python", "train.py"]) == 0
    assert "deploy/ci_key.txt   <-- looks like a PRIVATE KEY" in capsys.readouterr().out


# The uploaded zip, unpacked, must hold the whole package: import every module from it alone.
IMPORT_ALL = """
import importlib, pkgutil, sys
root = sys.argv[1]
# Only the unpacked upload: no editable-install finder may fill in what the zip lacks.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
sys.path.insert(0, root)
import dist_tempnet
names = ["dist_tempnet"] + [m.name for m in pkgutil.walk_packages(dist_tempnet.__path__, "dist_tempnet.")]
for name in names:
    module = importlib.import_module(name)
    assert module.__file__.startswith(root + "/"), f"{name} imported from {module.__file__}"
print("IMPORTED", len(names))
"""


@pytest.mark.slow
def test_uploaded_working_dir_imports_every_module_of_the_package(tmp_path):
    with zipfile.ZipFile(package_working_dir(REPO, tmp_path / "upload.zip")) as zf:
        zf.extractall(tmp_path / "job")
    expected = sum(1 for p in (REPO / "dist_tempnet").rglob("*.py") if "__pycache__" not in p.parts)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", IMPORT_ALL, str(tmp_path / "job")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"IMPORTED {expected}" in proc.stdout, proc.stdout
