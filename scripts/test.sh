#!/usr/bin/env bash
# Set up .venv if needed, then run the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 USE_HUB_KERNELS=0 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check moekit tests benchmarks experiments scripts
.venv/bin/pytest "$@"
