#!/usr/bin/env bash
# Submit a command to a Ray cluster through the Ray Jobs API, with this repository as the job's
# working directory; prints the job id, follows the logs and exits 0 only if the job SUCCEEDED.
#
#   launch/submit.sh [--address URL] [--no-wait] [--pip PKG ...|--image IMAGE] [--env KEY[=VALUE] ...] \
#       -- dist-tempnet train --config configs/clip_tiny.yaml train.steps=50
#
# The address defaults to RAY_ADDRESS (else http://127.0.0.1:8265). Token auth is used when a token
# exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). DS_ACCELERATOR, NCCL_*,
# MLFLOW_TRACKING_URI and MLflow/S3 credentials are forwarded from *this* environment. All the logic
# lives in `dist-tempnet submit` (dist_tempnet/submit.py); this wrapper only pins the working dir.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if command -v dist-tempnet >/dev/null 2>&1; then
    cli="dist-tempnet"
elif [[ -x "$repo/.venv/bin/dist-tempnet" ]]; then
    cli="$repo/.venv/bin/dist-tempnet"
else
    echo "submit.sh: 'dist-tempnet' not found: pip install -e . (or activate the project's .venv)" >&2
    exit 2
fi
exec "$cli" submit --working-dir "$repo" "$@"
