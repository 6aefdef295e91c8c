#!/usr/bin/env bash
# GPU check in one command on a CUDA machine that has PyTorch (see bench/gpu_check.py).
#   bash bench/gpu_check.sh OUT_DIR [--dry-run]
# Wheels carried in .whl/ (pydantic, pytorch-optimizer, …) are installed into a private target
# first, so nothing on the machine is changed; without them the worker section is skipped.
# Fetch them (on the development machine) with: bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_check.sh OUT_DIR [--dry-run]}
shift
py=${PYTHON:-python3}
if ! "$py" -c 'import pydantic, pydantic_settings, yaml, numpy, pytorch_optimizer' 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/dykaf-site .whl/*.whl; then
    export PYTHONPATH="/tmp/dykaf-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: carried wheels do not fit this Python; sections needing them will be skipped" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" bench/gpu_check.py --out "$out" "$@"
