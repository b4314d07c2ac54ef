"""Job submission: `dist-tempnet submit` / `launch/submit.sh` and `launch/local_cluster.sh`.

The fast tests cover what is sent (runtime env, forwarded variables, token auth, entrypoint
checks). The slow test does what docs/cluster.md tells users to do: start a local Ray head with
token auth, submit the tiny main job through launch/submit.sh, wait for SUCCEEDED, check the MLflow
run, and stop the head (always).
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dist_tempnet.commands.cli import build_parser
from dist_tempnet.config import ConfigError
from dist_tempnet.driver.submit import (
    build_runtime_env,
    check_entrypoint,
    enable_token_auth,
    forwarded_env,
    parse_cli_entrypoint,
)

REPO = Path(__file__).resolve().parents[1]
SUBMIT_SH = REPO / "launch" / "submit.sh"
CLUSTER_SH = REPO / "launch" / "local_cluster.sh"
# The tiny main job of docs/cluster.md (the MLflow URI is added per test).
TINY_JOB = [
    "dist-tempnet",
    "train",
    "train.steps=6",
    "train.log_every=3",
    "data.demo_num_train=512",
    "data.demo_num_eval=128",
    "ray.num_workers=2",
    "eval.max_batches=1",
]


def test_forwarded_env_takes_known_variables_from_the_environment_only():
    environ = {
        "NCCL_DEBUG": "INFO",
        "NCCL_SOCKET_IFNAME": "eth0",
        "DS_ACCELERATOR": "cuda",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_PASSWORD": "s3cret",
        "AWS_SECRET_ACCESS_KEY": "k",
        "HOME": "/root",
        "NCCLX": "no",
        "MY_FLAG": "1",
    }
    env = forwarded_env(environ, ["MY_FLAG", "EXTRA=2"])
    assert env == {
        "NCCL_DEBUG": "INFO",
        "NCCL_SOCKET_IFNAME": "eth0",
        "DS_ACCELERATOR": "cuda",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_PASSWORD": "s3cret",
        "AWS_SECRET_ACCESS_KEY": "k",
        "MY_FLAG": "1",
        "EXTRA": "2",
    }
    with pytest.raises(ValueError, match="MISSING: not set"):
        forwarded_env(environ, ["MISSING"])


def test_runtime_env_working_dir_pip_or_image():
    env = build_runtime_env(REPO, {"A": "1"}, ["einops==0.8.0"], None)
    assert (
        env["working_dir"] == str(REPO) and env["pip"] == ["einops==0.8.0"] and env["env_vars"] == {"A": "1"}
    )
    assert {"/.venv", "/data", "/runs", "*.db", ".env", ".ray/"} <= set(env["excludes"])
    assert build_runtime_env(None, {}, [], "ghcr.io/x/y:1")["image_uri"] == "ghcr.io/x/y:1"
    with pytest.raises(ValueError, match="exclusive"):
        build_runtime_env(None, {}, ["a"], "img")


def test_token_auth_is_enabled_when_a_token_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert enable_token_auth({}) is False
    environ = {"RAY_AUTH_TOKEN": "abc"}
    assert enable_token_auth(environ) is True and environ["RAY_AUTH_MODE"] == "token"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc")
    environ = {}
    assert enable_token_auth(environ) is True and environ["RAY_AUTH_MODE"] == "token"
    assert enable_token_auth({"RAY_AUTH_MODE": "disabled"}) is False


def test_entrypoints_are_checked_before_submission():
    parser = build_parser()
    cfg = check_entrypoint(
        "dist-tempnet train --config configs/clip_tiny.yaml train.steps=6", parser, lambda p: str(REPO / p)
    )
    assert cfg is not None and cfg.train.steps == 6
    assert check_entrypoint("python -c 'print(1)'", parser) is None
    with pytest.raises(ConfigError, match="train.stepz"):
        check_entrypoint("dist-tempnet train train.stepz=6", parser)
    with pytest.raises(ValueError, match="not a valid dist-tempnet command"):
        parse_cli_entrypoint("dist-tempnet trian --config x.yaml", parser)


def test_submit_refuses_a_bad_config_without_contacting_a_cluster():
    proc = subprocess.run(
        [str(SUBMIT_SH), "--address", "http://127.0.0.1:9", "--", *TINY_JOB, "train.steps=-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.steps" in proc.stderr and "must be > 0" in proc.stderr


def test_scripts_parse_and_show_usage():
    for script in (SUBMIT_SH, CLUSTER_SH):
        assert os.access(script, os.X_OK), f"{script} is not executable"
        subprocess.run(["bash", "-n", str(script)], check=True)
    proc = subprocess.run([str(CLUSTER_SH)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


# ---------------------------------------------------------------------------------------------
# A real local cluster


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _free_port_block() -> tuple[int, int]:
    """A GCS port whose next five ports are free too (local_cluster.sh uses them), and a dashboard port."""
    for _ in range(200):
        base = random.randrange(20000, 40000)
        dashboard = base + 10
        if _ports_free([*range(base, base + 6), dashboard]):
            return base, dashboard
    raise RuntimeError("no free port block found")


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """launch/local_cluster.sh start in a temporary HOME (its own token); stopped in any case."""
    home = tmp_path_factory.mktemp("home")
    port, dashboard = _free_port_block()
    env = dict(
        os.environ,
        HOME=str(home),
        DT_RAY_PORT=str(port),
        DT_DASHBOARD_PORT=str(dashboard),
        DT_NUM_CPUS="2",
        DT_RAY_TEMP_DIR=f"/tmp/dt_ray_test_{port}",
        DT_CLUSTER_STATE=str(home / "state"),
    )
    # The temporary HOME would otherwise make DeepSpeed rebuild its CPU comm op (minutes).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(key, None)
    try:
        start = subprocess.run(
            [str(CLUSTER_SH), "start"], env=env, capture_output=True, text=True, timeout=300
        )
        assert start.returncode == 0, start.stdout + start.stderr
        assert (home / ".ray" / "auth_token").is_file(), "local_cluster.sh start should generate a token"
        # What `local_cluster.sh start` tells users to export.
        env.update(RAY_ADDRESS=f"http://127.0.0.1:{dashboard}", RAY_AUTH_MODE="token")
        yield env
    finally:
        stop = subprocess.run([str(CLUSTER_SH), "stop"], env=env, capture_output=True, text=True, timeout=120)
        print(stop.stdout, stop.stderr)
        shutil.rmtree(env["DT_RAY_TEMP_DIR"], ignore_errors=True)


def _job_status(env: dict[str, str], job_id: str) -> str:
    code = (
        "import sys; from ray.job_submission import JobSubmissionClient as C; "
        "print(C(sys.argv[1]).get_job_status(sys.argv[2]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, env["RAY_ADDRESS"], job_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().split(".")[-1]


@pytest.mark.slow
def test_local_cluster_requires_the_token_and_runs_a_trivial_job(local_cluster):
    env = local_cluster
    no_token = dict(env, RAY_AUTH_MODE="disabled")
    proc = subprocess.run(
        [str(SUBMIT_SH), "--", "python", "-c", "print(1)"],
        env=no_token,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "could not submit" in proc.stderr and "token" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

    proc = subprocess.run(
        [
            str(SUBMIT_SH),
            "--no-wait",
            "--env",
            "DT_SUBMIT_TEST=ok",
            "--",
            "python",
            "-c",
            "import os; print('probe', os.environ['DT_SUBMIT_TEST'])",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = next(line.split("=", 1)[1] for line in proc.stdout.splitlines() if line.startswith("JOB_ID="))
    deadline = time.monotonic() + 300
    while (status := _job_status(env, job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(2)
    assert status == "SUCCEEDED"


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def _listening_sockets(process_group: int) -> list[tuple[str, Any]]:
    """(process name, local address) of every listening TCP socket of a process group."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if os.getpgid(proc.pid) == process_group:
                found += [
                    (proc.info["name"], c.laddr)
                    for c in proc.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN
                ]
        except (psutil.Error, ProcessLookupError):
            continue
    return found


@pytest.mark.slow
def test_local_cluster_listens_on_loopback_only_and_keeps_its_files_private(local_cluster):
    """Every listening TCP socket of the head's processes (GCS, raylet, agents, client server,
    dashboard, metrics) is on 127.0.0.1/::1; the token and Ray's session files are the user's only."""
    env = local_cluster
    head = int((Path(env["DT_CLUSTER_STATE"]) / "head.pid").read_text())
    port = int(env["DT_RAY_PORT"])
    # GCS, client server, dashboard agent (HTTP, gRPC), runtime-env agent, metrics, dashboard.
    expected = {*range(port, port + 6), int(env["DT_DASHBOARD_PORT"])}
    deadline = time.monotonic() + 120  # the agents come up a little after the Jobs API
    while True:
        listening = _listening_sockets(head)
        if expected <= {addr.port for _, addr in listening} or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert expected <= {addr.port for _, addr in listening}, listening
    exposed = [(name, f"{addr.ip}:{addr.port}") for name, addr in listening if not _is_loopback(addr.ip)]
    assert exposed == [], f"Ray head sockets reachable from other machines: {exposed}"

    token = Path(env["HOME"]) / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600, oct(token.stat().st_mode)
    # Ray chmods its session folders to 0777; the folder around them keeps other users out.
    assert stat.S_IMODE(Path(env["DT_RAY_TEMP_DIR"]).stat().st_mode) == 0o700


@pytest.mark.slow
def test_tiny_main_job_through_submit_sh_is_tracked_in_mlflow(local_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    env = local_cluster
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"  # sqlite:////abs/path: absolute, the job runs in a throwaway directory
    # The docs/cluster.md command: demo data and checkpoints land in the job's working directory.
    job = [*TINY_JOB, f"mlflow.tracking_uri={uri}"]
    proc = subprocess.run([str(SUBMIT_SH), "--", *job], env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert "SUCCEEDED" in proc.stdout, tail

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("dist_tempnet")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "batch/loss")
    assert [m.step for m in losses] == [3, 6]
