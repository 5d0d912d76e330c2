#!/usr/bin/env bash
# Create (once) the local environment .venv with moekit and its dev tools.
# A torch that the system Python can already import is reused; otherwise torch==2.13.0 is
# installed first (TORCH_SPEC overrides it), so that no other torch build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "== reusing the torch of $PY"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
    echo "== installing ${TORCH_SPEC:-torch==2.13.0}"
    .venv/bin/pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
stamp=.venv/.moekit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing moekit and its dependencies into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
fi
