#!/usr/bin/env bash
# Fresh machine -> running job. Sets up .venv (torch 2.13.0 when the venv has no torch, then this
# project with its dev extras) and runs one thing:
#   launch/quickstart.sh train [overrides...]   the main job (embedded default: tiny CLIP, 2 Ray
#                                               workers, DeepSpeed ZeRO-2, MLflow in ./mlflow.db)
#   launch/quickstart.sh test [pytest args...]  the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-train}"; shift || true

venv="${DIST_TEMPNET_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip > /dev/null 2>&1 || true
fi
py="$venv/bin/python"
# A plain `torch` requirement would pull a multi-GB CUDA build: install the CPU wheel first.
# pip's chatter goes to a log, shown only when an install fails.
quiet_pip() {
  "$py" -m pip "$@" > "$venv/pip.log" 2>&1 || { tail -n 40 "$venv/pip.log" >&2; echo "pip $* failed (log: $venv/pip.log)" >&2; exit 1; }
}
# On PyPI, torch==2.13.0 for Linux is the CUDA build (several GB). TORCH_INDEX_URL picks another
# wheel index, e.g. https://download.pytorch.org/whl/cpu for the CPU build on a machine without GPUs.
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[quickstart] installing torch 2.13.0 into $venv${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} ..."
  quiet_pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
# Re-install only when pyproject.toml changed since the last install.
stamp="$venv/.dist_tempnet-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$py" -c "import dist_tempnet" 2>/dev/null; then
  echo "[quickstart] installing dist_tempnet and its dependencies into $venv ..."
  quiet_pip install -q -e ".[dev]"
  "$py" -c "import dist_tempnet, deepspeed, ray, mlflow, webdataset" >/dev/null
  touch "$stamp"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export PATH="$PWD/$venv/bin:$PATH"

case "$what" in
  train) exec dist-tempnet train "$@" ;;
  test)  exec "$py" -m pytest -q "$@" ;;
  *) echo "usage: $0 train [overrides...] | test [pytest args...]" >&2; exit 2 ;;
esac
