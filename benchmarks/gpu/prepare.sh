#!/usr/bin/env bash
# Here (with PyPI): download the wheels the GPU machine lacks into .whl/ (ignored by git, carried there).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python -m pip download --no-deps -q -d .whl "diffusers==$(python -c 'import diffusers; print(diffusers.__version__)')" \
    "lycoris-lora==$(python -c 'import importlib.metadata as m; print(m.version("lycoris-lora"))')"
ls .whl
