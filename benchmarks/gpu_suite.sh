#!/usr/bin/env bash
# The GPU suite on one GPU (~8 min): LM loss op, 1.24B LLaMA worker loop, ViT-B/32 CLIP; one JSON
# line (SUITE_JSON ...) and one Markdown table. No Ray, webdataset or MLflow needed on the box: if
# deepspeed is missing, the wheels carried in .whl/ (DeepSpeed 0.19.8, webdataset and their small
# dependencies) are installed into /tmp/site first.
#   bash benchmarks/gpu_suite.sh            # on the GPU box
#   bash benchmarks/gpu_suite.sh --tiny     # CPU smoke (CI)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
if ! "$py" -c "import deepspeed, webdataset" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_suite: deepspeed/webdataset missing and no wheels in $root/.whl" >&2
    exit 1
  fi
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
# One process, no launcher: the worker loop reads the usual torch.distributed variables.
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29517}
if [[ " $* " == *" --tiny "* ]]; then export DS_ACCELERATOR=cpu; else export DS_ACCELERATOR=cuda; fi
exec "$py" benchmarks/gpu_suite.py "$@"
