#!/usr/bin/env bash
# Create .venv (if needed) and install covmodules with its dependencies.
# torch is installed first as the pinned CPU build when it is not importable, so that the
# package's `torch>=2.4` requirement does not pull a multi-GB CUDA build.
# A warm run costs a few tens of milliseconds: when .venv/.installed records the current
# pyproject.toml and every package is findable (importlib's find_spec, nothing imported),
# nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.installed
PACKAGES="torch covmodules training lightning torchmetrics tensorboard pandas formulaic pytest jsonargparse"
found() {
  .venv/bin/python -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' "$@" 2>/dev/null
}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ -f "$STAMP" ] && cmp -s "$STAMP" pyproject.toml && found $PACKAGES; then
  exit 0
fi
if ! found torch; then
  .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e ".[dev]"
cp pyproject.toml "$STAMP"
