#!/usr/bin/env bash
# Create .venv (if needed) and install covmodules with its dependencies.
# torch is installed first as the pinned CPU build when it is not importable, so that the
# package's `torch>=2.4` requirement does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet torch==2.13.0
fi
if ! .venv/bin/python -c "import covmodules, training, lightning, torchmetrics, tensorboard, pandas, pytest, jsonargparse" 2>/dev/null; then
  .venv/bin/pip install --quiet -e ".[dev]"
fi
