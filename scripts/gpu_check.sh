#!/usr/bin/env bash
# One short check of the GPU path on a lent CUDA machine (scripts/gpu_check.py says what it checks);
# it stops at the first failure and exits non-zero. Logs under $OUT (default /tmp/gpu_check).
# Wheels the machine's image lacks (pydantic, ...) may travel in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec python3 scripts/gpu_check.py "$@"
