#!/usr/bin/env bash
# On the GPU machine (no network; torch, transformers, peft, accelerate, safetensors preinstalled):
# install the carried wheels, then run the suite. Results: $OUT/gpu-full.json (or bench-out/).
# From a session: device run with carry [".whl"] and command "bash benchmarks/gpu/run.sh", timeout 540.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install --no-deps -q .whl/*.whl
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
python -m benchmarks.gpu.suite --out "${OUT:-bench-out}" "$@"
