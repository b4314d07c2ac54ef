"""Screenshots of the MLflow UI as a user sees it after a run: headless Chromium, driven by Playwright.

    python benchmarks/mlflow_screenshots.py OUT_DIR [--db MLFLOW_DB]

Without --db it first trains a tiny iSogCLR + TempNet run (--no-ray, a few steps) into
OUT_DIR/mlflow.db. It then starts `mlflow server` on that store (127.0.0.1, a free port) and writes:

- OUT_DIR/experiment.png: what opening the experiment shows (its runs, not the GenAI overview);
- OUT_DIR/run-metrics.png: the run's model-metric charts, in the order the UI lays them out;
- OUT_DIR/chart-order.txt: the chart sections in that order, read off the page.

Needs `pip install -e ".[screenshots]"` (Playwright) and a Chromium (Debian: `apt-get install -y chromium`; or
`playwright install chromium`); CHROMIUM=path picks the binary. Each page is shot once its content
is there (a run name, a chart section), not after a fixed delay: the UI is a single-page app that keeps
polling, so "page loaded" comes long before its data.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# MLflow 3.17's UI starts in GenAI mode (experiments open on a traces overview); this is its switch.
MODEL_TRAINING = "workflowType=machine_learning"
TINY_RUN = [
    "loss.name=isogclr_tempnet",
    "data.demo_num_train=128",
    "data.demo_num_eval=32",
    "data.image_size=16",
    "train.global_batch_size=16",
    "train.micro_batch_size=16",
    "train.steps=12",
    "train.log_every=1",
    "eval.every=6",
]


def train_tiny_run(out: Path, db: Path) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "dist_tempnet.commands.cli", "train", "--no-ray", *TINY_RUN]
    cmd += [f"mlflow.tracking_uri=sqlite:///{db}", f"run.output_dir={out}/runs", f"data.path={out}/data"]
    subprocess.run(cmd, cwd=out, env=env, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"mlflow server did not come up; see {log}")


def latest_run(db: Path) -> tuple[str, str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = next(e for e in client.search_experiments() if e.name != "Default")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
    return exp.experiment_id, run.info.run_id, run.info.run_name


def chart_sections(page) -> list[str]:
    """The run page's chart sections, top to bottom, as "name (number of charts)"."""
    lines = [line.strip() for line in page.inner_text("body").splitlines()]
    return [
        f"{lines[i]} {lines[i + 1]}"
        for i in range(len(lines) - 2)
        if re.fullmatch(r"\(\d+\)", lines[i + 1]) and lines[i + 2] == "Add chart"
    ]


def shoot(out: Path, url: str, exp: str, run_id: str, run_name: str, wait_s: float) -> list[str]:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(wait_s * 1000)
        page.goto(f"{url}/#/experiments/{exp}?{MODEL_TRAINING}")
        page.get_by_text(run_name, exact=False).first.wait_for()
        page.screenshot(path=str(out / "experiment.png"))
        page.goto(f"{url}/#/experiments/{exp}/runs/{run_id}/model-metrics?{MODEL_TRAINING}")
        page.get_by_text("Add chart").first.wait_for()
        page.wait_for_timeout(2000)  # the charts draw after their titles
        page.screenshot(path=str(out / "run-metrics.png"))
        titles = chart_sections(page)
        browser.close()
    return titles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--db", type=Path, default=None, help="an MLflow SQLite store (default: train one)")
    p.add_argument("--wait", type=float, default=180.0, help="seconds to wait for a page's content")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    db = args.db.resolve() if args.db else out / "mlflow.db"
    if args.db is None:
        train_tiny_run(out, db)
    exp, run_id, run_name = latest_run(db)
    server, url = start_server(db, out / "mlflow-ui.log")
    try:
        titles = shoot(out, url, exp, run_id, run_name, args.wait)
    finally:
        server.terminate()
        server.wait(30)
    (out / "chart-order.txt").write_text("\n".join(titles) + "\n")
    print(f"screenshots in {out}: experiment.png run-metrics.png; chart sections: {', '.join(titles)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
