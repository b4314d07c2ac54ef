"""`dist-tempnet submit`: run a command on a Ray cluster through the Ray Jobs API.

    dist-tempnet submit [--address URL] [--no-wait] [--pip PKG ... | --image IMAGE] [--env KEY[=VALUE] ...]
                        -- dist-tempnet train --config configs/clip_tiny.yaml train.steps=50

`launch/submit.sh` is this command with the repository as working directory. What it sends:

- working_dir: the repository, zipped and uploaded by Ray, prepended to the job's PYTHONPATH so the
  submitted code is what runs. Left out: what .gitignore/.rayignore list, the repository root's
  virtualenv, data, run and MLflow directories (anchored patterns: `dist_tempnet/data` is code and
  goes), and secrets anywhere in the tree (UPLOAD_EXCLUDES: dotenv files, key files, cloud
  credentials, .ray/, .git/). A file that still looks like a private key stops the submission unless
  `--force-secrets`; `--dry-run` lists what would be uploaded, with sizes, and contacts no cluster;
- runtime env: `--pip` packages installed for the job, or `--image` (Ray's image_uri, needs podman
  on the nodes), or neither when the nodes already have the package (our container image);
- env_vars: DS_ACCELERATOR, NCCL_*, MLFLOW_TRACKING_URI and the MLflow/S3 credentials, copied from
  the *submitting environment* (never read from files in the repository), plus `--env` entries;
  only their names are printed;
- token auth: `RAY_AUTH_MODE=token` is set when a token is available (RAY_AUTH_TOKEN,
  RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), and Ray's client sends it as a bearer token.

The entrypoint is checked before anything is uploaded: a `dist-tempnet` command must parse, and a
`dist-tempnet train --config FILE ...` config must load and validate here. Then the job id is
printed and its logs followed until it ends; the exit status is 0 only for SUCCEEDED.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_tempnet.config import Config, ConfigError, load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Forwarded from the submitting environment when set there (names, or prefixes ending in "_").
FORWARDED_ENV = (
    "DS_ACCELERATOR",
    "NCCL_",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "HF_HUB_OFFLINE",
    "HF_TOKEN",
)
# Never uploaded (Ray's `excludes`, gitignore syntax, relative to the working dir). A leading "/"
# anchors a pattern at the repository root: a bare "data" would also drop the dist_tempnet/data package.
UPLOAD_EXCLUDES = [
    # local environments, datasets, run outputs, local MLflow stores (of the repository root)
    "/.venv",
    "/venv",
    "/data",
    "/runs",
    "/mlruns",
    "/mlartifacts",
    "/exports",
    "*.db",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    # secrets, at any depth
    ".git",
    ".ray/",
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.p12",
    "*.pfx",
    "credentials.json",
    "*service-account*.json",
    ".aws/",
    "**/.config/gcloud/",
    ".netrc",
    ".pypirc",
    ".kube/",
    ".docker/config.json",
]
# What a private key file starts with (PEM: RSA, EC, DSA, OPENSSH, ENCRYPTED, PKCS#8; PuTTY).
PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----|PuTTY-User-Key-File-")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def forwarded_env(environ: dict[str, str], extra: list[str]) -> dict[str, str]:
    """Variables to hand to the job: the known ones present in `environ`, then `--env` entries."""
    env = {
        key: value
        for key, value in environ.items()
        if any(key == name or (name.endswith("_") and key.startswith(name)) for name in FORWARDED_ENV)
    }
    for item in extra:
        key, sep, value = item.partition("=")
        if not key:
            raise ValueError(f"--env {item!r}: expected KEY or KEY=VALUE")
        if sep:
            env[key] = value
        elif key in environ:
            env[key] = environ[key]
        else:
            raise ValueError(f"--env {key}: not set in this environment (use --env {key}=VALUE)")
    return env


def has_auth_token(environ: dict[str, str]) -> bool:
    if environ.get("RAY_AUTH_TOKEN"):
        return True
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).expanduser().is_file()
    return (Path.home() / ".ray" / "auth_token").is_file()


def enable_token_auth(environ: dict[str, str]) -> bool:
    """Turn on Ray token auth for this client when a token exists and the mode is not set."""
    if "RAY_AUTH_MODE" in environ:
        return environ["RAY_AUTH_MODE"].lower() == "token"
    if has_auth_token(environ):
        environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


@dataclass
class UploadedFile:
    path: str  # relative to the working dir
    size: int
    private_key: bool  # its content starts like a private key


def upload_excludes() -> list[str]:
    """Everything Ray leaves out of the working dir zip: its own defaults (.git, .venv, venv,
    __pycache__; RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES) and ours; .gitignore/.rayignore on top."""
    from ray._private.ray_constants import get_runtime_env_default_excludes

    return get_runtime_env_default_excludes() + UPLOAD_EXCLUDES


def package_working_dir(working_dir: Path, target: Path) -> Path:
    """Zip `working_dir` exactly as Ray does before uploading it (Ray's own packaging function, the
    same excludes, .gitignore and .rayignore honoured); returns `target`."""
    from ray._private.runtime_env.packaging import create_package

    quiet = logging.getLogger(__name__ + ".packaging")  # Ray logs each .gitignore it honours at INFO
    quiet.setLevel(logging.WARNING)
    create_package(str(working_dir), target, include_gitignore=True, excludes=upload_excludes(), logger=quiet)
    return target


def files_to_upload(working_dir: Path) -> list[UploadedFile]:
    """The files Ray would upload for `working_dir`, read back from the zip Ray's packaging builds."""
    with tempfile.TemporaryDirectory(prefix="dist-tempnet-upload-") as tmp:
        package = package_working_dir(working_dir, Path(tmp) / "working_dir.zip")
        found = []
        with zipfile.ZipFile(package) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                with zf.open(info) as f:
                    head = f.read(4096).lstrip()
                found.append(UploadedFile(info.filename, info.file_size, bool(PRIVATE_KEY.match(head))))
    return sorted(found, key=lambda f: f.path)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_upload(working_dir: Path, files: list[UploadedFile]) -> str:
    lines = [f"working_dir {working_dir}: {len(files)} files would be uploaded"]
    lines += [
        f"{_size(f.size):>10}  {f.path}{'   <-- looks like a PRIVATE KEY' if f.private_key else ''}"
        for f in files
    ]
    lines.append(f"{_size(sum(f.size for f in files)):>10}  total")
    return "\n".join(lines)


def build_runtime_env(
    working_dir: Path | None, env_vars: dict[str, str], pip: list[str], image: str | None
) -> dict[str, Any]:
    if pip and image:
        raise ValueError("--pip and --image are exclusive: an image brings its own packages")
    runtime_env: dict[str, Any] = {}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = list(UPLOAD_EXCLUDES)
    if pip:
        runtime_env["pip"] = list(pip)
    if image:
        runtime_env["image_uri"] = image
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


# ---------------------------------------------------------------------------------------------
# Entrypoint checks (shared with the Kubernetes manifest tests)


def parse_cli_entrypoint(entrypoint: str, parser: argparse.ArgumentParser) -> argparse.Namespace | None:
    """Parse a `dist-tempnet ...` command line with the real parser (`commands.cli.build_parser()`,
    passed in so that the driver does not import the command layer); None for other commands.

    Raises ValueError naming the problem when it is a dist-tempnet command that does not parse.
    """
    argv = shlex.split(entrypoint)
    if not argv or Path(argv[0]).name != "dist-tempnet":
        return None
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv[1:])
    except SystemExit as exc:
        detail = (errors.getvalue().strip().splitlines() or ["--help is not an entrypoint"])[-1]
        raise ValueError(f"entrypoint {entrypoint!r} is not a valid dist-tempnet command: {detail}") from exc


def check_entrypoint(entrypoint: str, parser: argparse.ArgumentParser, resolve_config=None) -> Config | None:
    """Validate a `dist-tempnet train|plan ...` entrypoint's config; returns it (None if no config).

    `resolve_config(path) -> local path` maps the config path the job will see to one readable
    here (e.g. the repository, or a ConfigMap's file); by default the path is used as is.
    """
    args = parse_cli_entrypoint(entrypoint, parser)
    if args is None or not hasattr(args, "overrides"):
        return None
    config = getattr(args, "config", None)
    local = resolve_config(config) if (config and resolve_config) else config
    return load_config(local, args.overrides)


def warn_about_paths(cfg: Config | None, env_vars: dict[str, str]) -> list[str]:
    """Relative paths land in the job's throwaway working directory on the cluster."""
    if cfg is None:
        return []
    warnings = []
    if not cfg.mlflow.tracking_uri and "MLFLOW_TRACKING_URI" not in env_vars and cfg.mlflow.enabled:
        warnings.append(
            "no MLflow tracking URI (mlflow.tracking_uri or MLFLOW_TRACKING_URI): the run is recorded "
            "in a SQLite file inside the job's temporary working directory"
        )
    if not Path(cfg.run.output_dir).is_absolute():
        warnings.append(
            f"run.output_dir={cfg.run.output_dir!r} is relative: checkpoints stay in the job's "
            "temporary working directory; use a shared absolute path on a real cluster"
        )
    return warnings


# ---------------------------------------------------------------------------------------------
# Submission


def follow_logs(client, job_id: str) -> None:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def wait_for_end(client, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Final status; tail_job_logs can end a moment before the status turns terminal."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def submit_when_ready(client, retry_s: float = 60.0, **job) -> str:
    """submit_job, retried while a just-started head has no job agent registered yet."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def submit(
    args: argparse.Namespace, parser: argparse.ArgumentParser, environ: dict[str, str] | None = None
) -> int:
    """Run `dist-tempnet submit` (`parser`: the CLI's own, to validate a dist-tempnet entrypoint)."""
    environ = os.environ if environ is None else environ
    entrypoint = shlex.join(args.entrypoint)
    if not entrypoint:
        raise SystemExit(
            "dist-tempnet submit: give the command to run after --, e.g. "
            "-- dist-tempnet train --config configs/clip_tiny.yaml"
        )
    working_dir = Path(args.working_dir).resolve() if args.working_dir else None

    def in_working_dir(path: str) -> str:
        return str(working_dir / path) if working_dir and not Path(path).is_absolute() else path

    try:
        env_vars = forwarded_env(dict(environ), args.env)
        cfg = check_entrypoint(entrypoint, parser, in_working_dir)
        runtime_env = build_runtime_env(working_dir, env_vars, args.pip, args.image)
    except (ValueError, ConfigError) as exc:
        print(f"dist-tempnet submit: {exc}", file=sys.stderr)
        return 2
    for warning in warn_about_paths(cfg, env_vars):
        print(f"dist-tempnet submit: warning: {warning}", file=sys.stderr)
    if working_dir is not None:
        # Ray's upload must honour .gitignore like the listing below (Ray skips it when this is 1).
        os.environ.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)
        files = files_to_upload(working_dir)
        if args.dry_run:
            print(format_upload(working_dir, files), flush=True)
        keys = [f.path for f in files if f.private_key]
        if keys and not args.force_secrets:
            print(
                f"dist-tempnet submit: refusing to upload what looks like private keys: {', '.join(keys)} "
                f"(under {working_dir}); remove them, list them in .gitignore or .rayignore, or pass "
                "--force-secrets",
                file=sys.stderr,
            )
            return 2
    if args.dry_run:
        print("dry run: nothing submitted", flush=True)
        return 0

    token = enable_token_auth(environ)
    address = args.address or environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = submit_when_ready(
            client,
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=args.submission_id,
            entrypoint_num_cpus=args.entrypoint_num_cpus,
            metadata={"submitted_by": "dist-tempnet submit"},
        )
    except (AuthenticationError, RuntimeError, ConnectionError) as exc:
        print(f"dist-tempnet submit: could not submit to {address}: {exc}", file=sys.stderr)
        return 1
    env_names = ", ".join(sorted(env_vars)) or "none"
    print(
        f"submitted job {job_id} to {address} (token auth {'on' if token else 'off'}; env: {env_names})",
        flush=True,
    )
    print(f"JOB_ID={job_id}", flush=True)
    if args.no_wait:
        print(
            f"follow it with:  ray job logs --address {address} -f {job_id}\n"
            f"status:          ray job status --address {address} {job_id}\n"
            f"stop:            ray job stop --address {address} {job_id}"
        )
        return 0
    try:
        follow_logs(client, job_id)
        status = wait_for_end(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the job keeps running (ray job stop --address {address} {job_id})",
            file=sys.stderr,
        )
        return 130
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1
