#!/usr/bin/env bash
# Download into .whl/ the wheels bench/gpu_check.sh installs on a device machine that has PyTorch but
# not the worker's other dependencies (pydantic and its compiled core, pydantic-settings, PyYAML,
# numpy for the token shards, pytorch-optimizer),
# built for that machine's Python. .whl/ is git-ignored: pass it to the device with carry [".whl"].
#   bash bench/fetch_gpu_wheels.sh [PYTHON_VERSION]     # default 3.12 (the lent machines' Python)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
pip=${PIP:-.venv/bin/pip}
rm -rf .whl
mkdir -p .whl
common=(--quiet --only-binary=:all: --implementation cp --python-version "$version"
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
        --dest .whl)
"$pip" download "${common[@]}" pydantic pydantic-settings pyyaml numpy  # with pydantic-core and friends
"$pip" download "${common[@]}" --no-deps pytorch-optimizer # its torch is the machine's own
ls .whl
