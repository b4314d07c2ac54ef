#!/usr/bin/env bash
# Screenshots of the MLflow UI (headless Chromium) for a finished tiny run: how a user sees it.
#
#   benchmarks/mlflow_screenshots.sh OUT_DIR [MLFLOW_DB]
#
# Without MLFLOW_DB it trains a tiny CLIP run (--no-ray, a few steps) into OUT_DIR/mlflow.db first.
# Writes OUT_DIR/experiment.png (what opening the experiment shows), OUT_DIR/run.png (the run's
# overview) and OUT_DIR/run-metrics.png (its model-metric charts). Needs `chromium`
# (Debian: apt-get install -y chromium) and the project's Python environment (PYTHON, default python).
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR [MLFLOW_DB]}")
mkdir -p "$out"
py=${PYTHON:-python}
db=${2:-}
if [[ -z "$db" ]]; then
  db="$out/mlflow.db"
  (cd "$out" && DS_ACCELERATOR=cpu "$py" -m dist_tempnet.commands.cli train --no-ray \
    "mlflow.tracking_uri=sqlite:///$db" "run.output_dir=$out/runs" "data.path=$out/data" \
    data.demo_num_train=128 data.demo_num_eval=32 data.image_size=16 loss.name=isogclr_tempnet \
    train.global_batch_size=16 train.micro_batch_size=16 train.steps=12 train.log_every=1 eval.every=6)
fi
db=$(realpath "$db")
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$py" -m mlflow server --backend-store-uri "sqlite:///$db" --host 127.0.0.1 --port "$port" --workers 1 \
  >"$out/mlflow-ui.log" 2>&1 &
ui=$!
trap 'kill $ui 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.5; done
read -r exp run < <("$py" - "$db" <<'PY'
import sys
from mlflow.tracking import MlflowClient
c = MlflowClient(f"sqlite:///{sys.argv[1]}")
exp = next(e for e in c.search_experiments() if e.name != "Default")
run = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
print(exp.experiment_id, run.info.run_id)
PY
)
shot() {  # URL FILE: the UI is a single-page app that keeps polling: wait a fixed time, then shoot
  # (--virtual-time-budget never ends on it). SHOT_WAIT_MS: longer on a busy machine.
  timeout 300 chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
    --timeout="${SHOT_WAIT_MS:-30000}" --window-size=1400,1000 --screenshot="$2" "$1" 2>/dev/null || true
  [[ -s "$2" ]] || { echo "no screenshot of $1" >&2; return 1; }
}
base="http://127.0.0.1:$port/#/experiments/$exp"
shot "$base" "$out/experiment.png"
shot "$base/runs/$run" "$out/run.png"
shot "$base/runs/$run/model-metrics" "$out/run-metrics.png"
echo "screenshots in $out: experiment.png run.png run-metrics.png (experiment $exp, run $run)"
